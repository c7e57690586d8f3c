"""Prompt-tuning defenses. Each tunes a few parameters on a frozen CLIP from clean few-shot images."""
import torch

from ..errors import UserError


def descend(loss, opt, sched=None, where="", hint=""):
    """One optimiser step on `loss`; a NaN/inf loss stops the run with a UserError saying where and what to try."""
    if not torch.isfinite(loss):
        raise UserError(f"loss became {loss.item()} at {where}; {hint or 'check the model and data'}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()
