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
