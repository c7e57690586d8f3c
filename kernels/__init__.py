"""Triton kernels of the RVPT fast path: prompt-aware attention and the fused RVPT loss.

Importing this package does not import triton: `triton_available()` may be asked on any machine, and
the kernel modules are loaded on first use (`kernels.prompt_attention` etc.). To run the kernels on
CPU tensors, TRITON_INTERPRET=1 must be in the environment before triton is first imported (triton's
own library functions are @triton.jit too, decorated at import).
"""
import importlib
import importlib.util
import os

__all__ = ["prompt_attention", "prompt_attention_reference", "repel_ce_loss", "repel_ce_loss_reference",
           "triton_available"]

_LAZY = {
    "prompt_attention": ".prompt_attention",
    "prompt_attention_reference": ".prompt_attention",
    "repel_ce_loss": ".repel_loss",
    "repel_ce_loss_reference": ".repel_loss",
}


def triton_available():
    """True when triton can be imported and kernels can run: on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch
    return torch.cuda.is_available()


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        # Bind the functions as package attributes: the import above set `kernels.prompt_attention`
        # to the submodule, and the function must win (`from kernels import prompt_attention`).
        # For the module itself use importlib.import_module("kernels.prompt_attention").
        for attr, source in _LAZY.items():
            if source == _LAZY[name]:
                globals()[attr] = getattr(module, attr)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
