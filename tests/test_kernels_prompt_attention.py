"""kernels.prompt_attention against the torch reference: output and every gradient.
Tolerance rule and the interpreter set-up: tests/kernel_helpers.py."""
import importlib

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, DTYPES, SKIP_REASON, poison_buffers  # noqa: E402

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pa = importlib.import_module("kernels.prompt_attention")

# Floors on top of the 2x rule, per dtype (scaled by the magnitude of the reference, see above).
FLOOR = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    poison_buffers(monkeypatch)


def make_inputs(B, H, N, b, d, dtype, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    k_p, v_p = (torch.randn(H, b, d, generator=g) for _ in range(2))
    do = torch.randn(B, H, N, d, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v, k_p, v_p)], do.to(DEVICE, dtype)


def run(fn, inputs, do, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    o = fn(*leaves, **kw)
    grads = torch.autograd.grad(o, leaves, do.to(dtype))
    return o, grads


def check_all(inputs, do, dtype, scale=None, fn=None, **kw):
    fn = fn or pa.prompt_attention
    inputs, do = [t.to(dtype) for t in inputs], do.to(dtype)  # the fp64 reference sees the same inputs
    ref = pa.prompt_attention_reference
    outs = run(fn, inputs, do, dtype, scale=scale, **kw)
    same = run(ref, inputs, do, dtype, scale=scale)
    exact = run(ref, [t.cpu() for t in inputs], do.cpu(), torch.float64, scale=scale)
    names = ["o", "dq", "dk", "dv", "dk_p", "dv_p"]
    for name, got, base, want in zip(names, [outs[0], *outs[1]], [same[0], *same[1]], [exact[0], *exact[1]]):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
        err = (got.double().cpu() - want).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, want.abs().max().item())
        tol = 2 * (base.double().cpu() - want).abs().max().item() + floor
        assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} ({dtype})"


# (B, H, N, b, d): ragged tails everywhere; N=50 / b=40 span two 32-blocks; d=20, 80 are padded.
SHAPES = [(2, 2, 17, 3, 16), (1, 2, 50, 8, 32), (2, 1, 5, 40, 20), (1, 1, 65, 8, 80)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}b{}d{}".format(*s))
def test_matches_reference(shape, dtype):
    inputs, do = make_inputs(*shape, dtype=torch.float32)
    check_all(inputs, do, dtype)


def test_strided_qkv_views_and_scale():
    """q, k, v as views of one fused projection (B, N, 3, H, d), the layout of a ViT block."""
    B, H, N, b, d = 2, 2, 33, 5, 16
    qkv = torch.randn(B, N, 3, H, d, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    kv_p = torch.randn(b, 2, H, d, device=DEVICE).permute(1, 2, 0, 3)  # (2, H, b, d) view
    assert not q.is_contiguous() and not kv_p[0].is_contiguous()
    do = torch.randn(B, H, N, d, device=DEVICE)
    check_all([q, k, v, kv_p[0], kv_p[1]], do, torch.float16, scale=0.3)


def test_all_scores_negative():
    """Every logit well below 0 (row lse < -16 in base 2): padded key slots, whose raw score is 0,
    must stay masked, else exp2(0 - lse) > 2^16 overflows fp16 in the backward (NaN in dq)."""
    B, H, N, b, d = 1, 2, 17, 3, 16
    (q, k, v, k_p, v_p), do = make_inputs(B, H, N, b, d, dtype=torch.float32)
    q = 3 + q.abs()
    k, k_p = -1 - k.abs(), -1 - k_p.abs()
    check_all([q, k, v, k_p, v_p], do, torch.float16)


@pytest.mark.parametrize("programs", [1, 3, 100], ids=["one_group", "ragged_groups", "group_per_image"])
def test_prompt_grads_image_groups(monkeypatch, programs):
    """The prompt dK/dV pass sums groups of images per program: 5 images as 1x5, 2+2+1 or 5x1."""
    monkeypatch.setattr(pa, "_prompt_programs", lambda device: programs)
    inputs, do = make_inputs(5, 1, 9, 4, 16, dtype=torch.float32)
    check_all(inputs, do, torch.float32)


def test_atomic_prompt_grads():
    inputs, do = make_inputs(3, 2, 20, 6, 16, dtype=torch.float32)
    check_all(inputs, do, torch.float32, deterministic=False)


def test_deterministic_prompt_grads_bit_identical():
    inputs, do = make_inputs(4, 1, 40, 6, 16, dtype=torch.float16)
    first = run(pa.prompt_attention, inputs, do, torch.float16)[1]
    second = run(pa.prompt_attention, inputs, do, torch.float16)[1]
    for a, b in zip(first[3:], second[3:]):
        assert torch.equal(a, b)


def test_prompt_grads_skipped_when_not_needed():
    (q, k, v, k_p, v_p), do = make_inputs(1, 1, 9, 3, 16, dtype=torch.float32)
    q.requires_grad_()
    o = pa.prompt_attention(q, k, v, k_p, v_p)
    (dq,) = torch.autograd.grad(o, [q], do)
    want = torch.autograd.grad(pa.prompt_attention_reference(q, k, v, k_p, v_p), [q], do)[0]
    assert torch.allclose(dq, want, atol=1e-5)


def test_output_layout_is_token_major():
    (q, k, v, k_p, v_p), _ = make_inputs(2, 3, 7, 2, 16, dtype=torch.float32)
    o = pa.prompt_attention(q, k, v, k_p, v_p)
    assert o.shape == (2, 3, 7, 16) and o.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("case, match", [
    ("k_shape", "share one"),
    ("p_heads", r"\(H, b, d\)"),
    ("p_batched", r"\(H, b, d\)"),
    ("dtype_mix", "one dtype"),
    ("int_dtype", "one dtype"),
    ("device", "device|TRITON_INTERPRET"),
])
def test_bad_inputs_raise_value_error(case, match):
    (q, k, v, k_p, v_p), _ = make_inputs(1, 2, 5, 3, 16, dtype=torch.float32)
    if case == "k_shape":
        k = k[:, :, :4]
    elif case == "p_heads":
        k_p = v_p = k_p[:1]
    elif case == "p_batched":
        k_p = v_p = k_p.unsqueeze(0)
    elif case == "dtype_mix":
        v = v.half()
    elif case == "int_dtype":
        q, k, v, k_p, v_p = (t.long() for t in (q, k, v, k_p, v_p))
    elif case == "device":
        if DEVICE == "cpu":
            q = q.to("meta")
        else:
            q = q.cpu()
    with pytest.raises(ValueError, match=match):
        pa.prompt_attention(q, k, v, k_p, v_p)
