"""CA, ASR and PA as docs/ALGORITHMS.md ("Metrics") defines them, in percent (0..100)."""
from .errors import UserError


def clean_accuracy(preds, labels):
    """CA: top-1 accuracy on clean images."""
    return 100.0 * (preds == labels).float().mean().item()


def attack_success_rate(triggered_preds, labels, target):
    """ASR: over triggered images whose true label is not the target, the fraction predicted as target."""
    keep = labels != target
    if not keep.any():
        raise UserError(f"ASR is undefined: all {len(labels)} test images belong to the target class, so none "
                        f"can be sent to it; the test set needs images of other classes")
    return 100.0 * (triggered_preds[keep] == target).float().mean().item()


def poisoned_accuracy(triggered_preds, labels):
    """PA: accuracy on triggered images with respect to their true labels."""
    return 100.0 * (triggered_preds == labels).float().mean().item()
