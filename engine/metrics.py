"""CA, ASR and PA as docs/ALGORITHMS.md ("Metrics") defines them, in percent (0..100)."""
from .errors import UserError


def _percent(hits, n):
    return 100.0 * int(hits) / int(n)    # counts, so that shares summed over ranks give the same number


def clean_accuracy(preds, labels):
    """CA: top-1 accuracy on clean images."""
    return _percent((preds == labels).sum(), len(labels))


def attack_success_rate(triggered_preds, labels, target):
    """ASR: over triggered images whose true label is not the target, the fraction predicted as target."""
    keep = labels != target
    if not keep.any():
        raise UserError(f"ASR is undefined: all {len(labels)} test images belong to the target class, so none "
                        f"can be sent to it; the test set needs images of other classes")
    return _percent((triggered_preds[keep] == target).sum(), keep.sum())


def poisoned_accuracy(triggered_preds, labels):
    """PA: accuracy on triggered images with respect to their true labels."""
    return _percent((triggered_preds == labels).sum(), len(labels))


def attack_counts(clean_preds, triggered_preds, labels, target):
    """[clean correct, images, triggered non-target images sent to target, non-target images, triggered
    correct]: what CA, ASR and PA are ratios of (summed over ranks by engine.distributed)."""
    keep = labels != target
    return [int((clean_preds == labels).sum()), len(labels), int((triggered_preds[keep] == target).sum()),
            int(keep.sum()), int((triggered_preds == labels).sum())]


def attack_rates(counts):
    """{'ca', 'asr', 'pa'} % from attack_counts."""
    correct, n, hits, others, trig_correct = counts
    return {"ca": _percent(correct, n), "asr": _percent(hits, others), "pa": _percent(trig_correct, n)}
