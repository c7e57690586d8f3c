"""Prompt-tuning defenses. Each tunes a few parameters on a frozen CLIP from clean few-shot images."""
from ..optim import check_finite, descend, minibatch_epochs  # noqa: F401 (the loop the defenses share)
