"""Shared pytest setup.

Without CUDA the Triton kernel tests run under the Triton interpreter, which must be switched on
before triton is first imported (its own library is @triton.jit too), so here, first.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
