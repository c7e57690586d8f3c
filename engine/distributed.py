"""torchrun support: the same job on N processes (torch.distributed; gloo on CPUs, NCCL on GPUs).

    torchrun --nproc_per_node 2 -m engine.tune --defense rvpt --fused
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 --nproc_per_node 8 -m engine.tune ...

What is spread over the ranks, and how results stay those of one process:
- tuning: every rank draws the same global batches (same seed) and the same augmentations, then computes
  the loss on its contiguous share of the batch only, weighted by its share's size; the gradients are
  summed over ranks before each step, so every rank takes the step one process would take on the whole
  batch (equal up to floating-point summation order);
- evaluation: each rank predicts a contiguous share of the test images; the counts are summed;
- the scan: every rank holds every class's trigger, but runs the forward and backward of its contiguous
  share of the classes (or stripe candidates) only; the gradients (zero outside a rank's rows) are summed,
  so every rank takes one process's step; per-class measurements are gathered with fill_rows.
Only rank 0 prints tables and writes the run directory. Without torchrun (WORLD_SIZE unset or 1) every
function here is the single-process identity."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world():
    return dist.get_world_size() if active() else 1


def rank():
    return dist.get_rank() if active() else 0


def is_main():
    return rank() == 0


def init(device):
    """Join the process group torchrun describes (its WORLD_SIZE / RANK / MASTER_* variables); returns the
    device this rank uses (cuda:LOCAL_RANK on GPUs). A no-op without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return device


def bounds(n):
    """[start, end) of this rank's contiguous share of n items (the first n % world ranks get one more)."""
    w, r = world(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def shard(*tensors):
    """This rank's share of each tensor's leading dim, and its weight (share size / batch size) that turns
    the share's mean loss into its part of the whole batch's mean."""
    n = len(tensors[0])
    start, end = bounds(n)
    return tuple(t[start:end] for t in tensors) + ((end - start) / n,)


def sum_gradients(params):
    """Sum each parameter's gradient over the ranks (the shares' weighted losses add up to the batch's)."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_counts(counts):
    """Sum a list of integer counts over the ranks."""
    if not active():
        return list(counts)
    t = torch.tensor(counts, dtype=torch.int64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def fill_rows(mine, n, start):
    """The (n, ...) tensor every rank gets when each contributes its rows [start, start + len(mine)) (the
    others zero): an all-gather of contiguous shares by one summing all-reduce."""
    full = mine.new_zeros((n, *mine.shape[1:]))
    full[start:start + len(mine)] = mine
    if active():
        t = full.to(_device())
        dist.all_reduce(t)
        full = t.to(mine.device)
    return full


def sum_value(x):
    """Sum a Python float over the ranks (for logged losses)."""
    if not active():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.item()
