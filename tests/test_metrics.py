import pytest
import torch

from engine.errors import UserError
from engine.metrics import attack_success_rate, clean_accuracy, poisoned_accuracy


def test_metrics_on_a_hand_made_case():
    labels = torch.tensor([0, 1, 2, 2, 1])
    assert clean_accuracy(torch.tensor([0, 1, 2, 0, 0]), labels) == pytest.approx(60.0)
    trig = torch.tensor([2, 2, 2, 1, 1])
    # target 2: the two images of class 2 are excluded; 2 of the other 3 hit the target
    assert attack_success_rate(trig, labels, 2) == pytest.approx(200 / 3)
    assert poisoned_accuracy(trig, labels) == pytest.approx(40.0)  # positions 2 and 4


def test_asr_needs_a_non_target_image():
    """A UserError (one-line 'error:' from the CLIs), not a ValueError traceback."""
    with pytest.raises(UserError, match="ASR is undefined: all 2 test images belong to the target class"):
        attack_success_rate(torch.tensor([1, 1]), torch.tensor([1, 1]), 1)


def test_rates_from_counts_summed_over_shards_equal_the_whole_set():
    from engine.metrics import attack_counts, attack_rates
    g = torch.Generator().manual_seed(3)
    labels, clean, trig = (torch.randint(4, (101,), generator=g) for _ in range(3))
    whole = attack_counts(clean, trig, labels, 2)
    parts = [attack_counts(clean[a:b], trig[a:b], labels[a:b], 2) for a, b in ((0, 51), (51, 101))]
    summed = [x + y for x, y in zip(*parts)]
    assert summed == whole
    rates = attack_rates(summed)
    assert rates == {"ca": clean_accuracy(clean, labels), "asr": attack_success_rate(trig, labels, 2),
                     "pa": poisoned_accuracy(trig, labels)}
