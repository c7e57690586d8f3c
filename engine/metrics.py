"""CA, ASR and PA as SPEC.md defines them, in percent (0..100)."""


def clean_accuracy(preds, labels):
    """CA: top-1 accuracy on clean images."""
    return 100.0 * (preds == labels).float().mean().item()


def attack_success_rate(triggered_preds, labels, target):
    """ASR: over triggered images whose true label is not the target, the fraction predicted as target."""
    keep = labels != target
    if not keep.any():
        raise ValueError("ASR is undefined: every image belongs to the target class")
    return 100.0 * (triggered_preds[keep] == target).float().mean().item()


def poisoned_accuracy(triggered_preds, labels):
    """PA: accuracy on triggered images with respect to their true labels."""
    return 100.0 * (triggered_preds == labels).float().mean().item()
