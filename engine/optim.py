"""The one optimisation loop every tuner, inversion and trainer uses: a checked step (descend) and
shuffled mini-batch epochs over it (minibatch_epochs), with progress bars and NaN checks."""
import sys

import torch
from tqdm import tqdm

from . import distributed
from .errors import UserError


def check_finite(loss, where="", hint=""):
    """A NaN/inf loss stops the run with a UserError saying where and what to try."""
    if not torch.isfinite(loss):
        raise UserError(f"loss became {loss.item()} at {where}; {hint or 'check the model and data'}")


def descend(loss, opt, sched=None, where="", hint="", sharded=False):
    """One optimiser step on `loss` (checked finite first). sharded: `loss` is this rank's weighted share
    of the batch's (engine.distributed.shard): gradients and the returned loss are summed over ranks."""
    check_finite(loss, where, hint)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sharded:
        distributed.sum_gradients([p for group in opt.param_groups for p in group["params"]])
    opt.step()
    if sched is not None:
        sched.step()
    return distributed.sum_value(loss.item()) if sharded else loss.item()


def minibatch_epochs(n, batch, epochs, generator, loss_of, opt, sched=None, desc="", hint="", progress=True,
                     device="cpu", sharded=False):
    """Shuffled mini-batch epochs over n examples: loss_of(indices) -> loss, one `descend` each.
    sharded: loss_of returns this rank's weighted share of the batch's loss (engine.distributed.shard);
    every rank draws the same batches. Returns the per-epoch mean losses; a progress bar shows the last."""
    history = []
    bar = tqdm(range(epochs), desc=desc, file=sys.stderr, disable=not progress or not distributed.is_main(), mininterval=2)
    for epoch in bar:
        perm = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for i in range(0, n, batch):
            b = perm[i:i + batch]
            total += len(b) * descend(loss_of(b), opt, sched, where=f"{desc} epoch {epoch + 1} step {i // batch + 1}",
                                      hint=hint, sharded=sharded)
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    return history
