"""Triton kernels of the RVPT fast path: prompt-aware attention and the fused RVPT loss.

Each op is one module holding its Triton kernels, its torch.autograd.Function and a function API:
`kernels.prompt_attention.prompt_attention`, `kernels.repel_loss.repel_ce_loss`. Their plain torch
references are in `kernels.reference` (torch only), the helpers both ops share in `kernels._common`.
The package imports nothing outside itself but torch and triton.

Importing this package does not import triton: `triton_available()` may be asked on any machine, and
`kernels.reference` works without triton. To run the kernels on CPU tensors, TRITON_INTERPRET=1 must be
in the environment before triton is first imported (triton's own library functions are @triton.jit
too, decorated at import).
"""
import importlib.util
import os

__all__ = ["triton_available"]


def triton_available():
    """True when triton can be imported and kernels can run: on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch
    return torch.cuda.is_available()
