"""kernels.prompt_attention against the torch reference (kernels.reference): output and every gradient.
Tolerance rule, the interpreter set-up and the seeded inputs: tests/kernel_helpers.py."""
import ast
import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import DEVICE, DTYPES, SKIP_REASON, poison_buffers, rng  # noqa: E402,F401

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from triton.runtime.errors import OutOfResources  # noqa: E402

from kernels.reference import prompt_attention_reference as reference  # noqa: E402

pa = importlib.import_module("kernels.prompt_attention")
common = importlib.import_module("kernels._common")

# Floors on top of the 2x rule, per dtype (scaled by the magnitude of the reference, see above).
FLOOR = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
NAMES = ["o", "dq", "dk", "dv", "dk_p", "dv_p"]
ALL = (True,) * 5


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    poison_buffers(monkeypatch)


def make_inputs(rng, B, H, N, b, d):
    """Fresh fp32 inputs on DEVICE from the test's generator: q, k, v, k_p, v_p and the output gradient."""
    q, k, v = (rng.randn(B, H, N, d) for _ in range(3))
    k_p, v_p = (rng.randn(H, b, d) for _ in range(2))
    do = rng.randn(B, H, N, d)
    return [t.to(DEVICE) for t in (q, k, v, k_p, v_p)], do.to(DEVICE)


def run(fn, inputs, do, dtype, needs=ALL, **kw):
    """Output and the gradients of the inputs flagged in `needs` (None for the others)."""
    leaves = [t.detach().to(dtype).requires_grad_(n) for t, n in zip(inputs, needs)]
    o = fn(*leaves, **kw)
    wanted = [t for t, n in zip(leaves, needs) if n]
    got = iter(torch.autograd.grad(o, wanted, do.to(dtype)))
    return o, [next(got) if n else None for n in needs]


def check_all(rng, inputs, do, dtype, scale=None, fn=None, needs=ALL, **kw):
    """The kernel's output and every requested gradient against the fp64 reference (2x rule)."""
    fn = fn or pa.prompt_attention
    inputs, do = [t.to(dtype) for t in inputs], do.to(dtype)  # the fp64 reference sees the same inputs
    outs = run(fn, inputs, do, dtype, needs, scale=scale, **kw)
    same = run(reference, inputs, do, dtype, needs, scale=scale)
    exact = run(reference, [t.cpu() for t in inputs], do.cpu(), torch.float64, needs, scale=scale)
    checked = []
    for name, got, base, want in zip(NAMES, [outs[0], *outs[1]], [same[0], *same[1]], [exact[0], *exact[1]]):
        if want is None:
            continue
        where = f"{name} ({dtype}, {rng})"
        assert got is not None and got.shape == want.shape and got.dtype == dtype, where
        assert torch.isfinite(got).all(), f"{where}: non-finite values (unwritten output?)"
        err = (got.double().cpu() - want).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, want.abs().max().item())
        tol = 2 * (base.double().cpu() - want).abs().max().item() + floor
        assert err <= tol, f"{where}: max error {err:.3g} > tolerance {tol:.3g}"
        checked.append(name)
    assert len(checked) == 1 + sum(needs)
    return outs


# (B, H, N, b, d): ragged tails everywhere; N=50 / b=40 span two 32-blocks; d=20, 80 are padded.
# vitb32: one ViT-B/32 block (12 heads, 50 tokens, 50 prompt tokens, d = 64) at a small batch.
SHAPES = [
    pytest.param((2, 2, 17, 3, 16), id="B2H2N17b3d16"),
    pytest.param((1, 2, 50, 8, 32), id="B1H2N50b8d32"),
    pytest.param((2, 1, 5, 40, 20), id="B2H1N5b40d20"),
    pytest.param((1, 1, 65, 8, 80), id="B1H1N65b8d80"),
    pytest.param((2, 12, 50, 50, 64), id="vitb32_B2H12N50b50d64"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, rng):
    inputs, do = make_inputs(rng, *shape)
    check_all(rng, inputs, do, dtype)


def test_vitb32_atomic_prompt_grads(rng):
    """The ViT-B/32 block once more through the atomic prompt-gradient path (and the autotuned forward)."""
    inputs, do = make_inputs(rng, 1, 12, 50, 50, 64)
    check_all(rng, inputs, do, torch.float32, deterministic=False)


def test_strided_qkv_views_and_scale(rng):
    """q, k, v as views of one fused projection (B, N, 3, H, d), the layout of a ViT block."""
    B, H, N, b, d = 2, 2, 33, 5, 16
    qkv = rng.randn(B, N, 3, H, d).to(DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    kv_p = rng.randn(b, 2, H, d).to(DEVICE).permute(1, 2, 0, 3)  # (2, H, b, d) view
    assert not q.is_contiguous() and not kv_p[0].is_contiguous()
    do = rng.randn(B, H, N, d).to(DEVICE)
    check_all(rng, [q, k, v, kv_p[0], kv_p[1]], do, torch.float16, scale=0.3)


def test_all_scores_negative(rng):
    """Every logit well below 0 (row lse < -16 in base 2): padded key slots, whose raw score is 0,
    must stay masked, else exp2(0 - lse) > 2^16 overflows fp16 in the backward (NaN in dq)."""
    (q, k, v, k_p, v_p), do = make_inputs(rng, 1, 2, 17, 3, 16)
    q = 3 + q.abs()
    k, k_p = -1 - k.abs(), -1 - k_p.abs()
    check_all(rng, [q, k, v, k_p, v_p], do, torch.float16)


@pytest.mark.parametrize("programs", [1, 3, 100], ids=["one_group", "ragged_groups", "group_per_image"])
def test_prompt_grads_image_groups(monkeypatch, programs, rng):
    """The prompt dK/dV pass sums groups of images per program: 5 images as 1x5, 2+2+1 or 5x1."""
    monkeypatch.setattr(pa, "_prompt_programs", lambda device: programs)
    inputs, do = make_inputs(rng, 5, 1, 9, 4, 16)
    check_all(rng, inputs, do, torch.float32)


def test_atomic_prompt_grads(rng):
    inputs, do = make_inputs(rng, 3, 2, 20, 6, 16)
    check_all(rng, inputs, do, torch.float32, deterministic=False)


def test_deterministic_bit_identical(rng):
    """deterministic=True: the output and every gradient are bit-identical from one call to the next."""
    inputs, do = make_inputs(rng, 4, 1, 40, 6, 16)
    first = check_all(rng, inputs, do, torch.float16)
    second = run(pa.prompt_attention, inputs, do, torch.float16)
    for name, a, b in zip(NAMES, [first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b), f"{name}: not bit-identical ({rng})"


@pytest.mark.parametrize("needs", [(True, False, False, False, False), (False, True, True, False, False),
                                   (False, False, False, True, True), (True, False, False, True, False)],
                         ids=["q", "kv", "prompt_kv", "q_and_k_p"])
def test_only_needed_grads(needs, rng):
    """Gradients of a subset of the inputs: those computed match, the kernels for the others are skipped."""
    inputs, do = make_inputs(rng, 2, 2, 9, 3, 16)
    check_all(rng, inputs, do, torch.float32, needs=needs)


def test_output_layout_is_token_major(rng):
    (q, k, v, k_p, v_p), _ = make_inputs(rng, 2, 3, 7, 2, 16)
    o = pa.prompt_attention(q, k, v, k_p, v_p)
    assert o.shape == (2, 3, 7, 16) and o.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(o, reference(q, k, v, k_p, v_p), msg=lambda m: f"{m}\n{rng}")


class _TooBig:
    """A kernel whose launches with blocks above 32 (for the launches picked by `when`) raise OutOfResources,
    as a config beyond the device's shared memory does, before anything runs."""

    def __init__(self, kernel, when=lambda args: True):
        self.kernel, self.when, self.blocks = kernel, when, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            block = (kw["BLOCK_M"], kw.get("BLOCK_N"))
            self.blocks.append(block)
            if max(b for b in block if b) > 32 and self.when(args):
                raise OutOfResources(65536, 49152, "shared memory")
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.mark.parametrize("deterministic", [True, False], ids=["partials", "atomics"])
def test_backward_falls_back_to_smaller_blocks(monkeypatch, deterministic, rng):
    """The prompt dK/dV launch (the last of the backward) does not fit: the whole backward reruns with
    the next config, on fresh buffers (the atomic sums start from zero again), and later calls start there."""
    monkeypatch.setattr(pa, "_FITS", {})
    monkeypatch.setattr(pa, "_bwd_configs", lambda block_d, dtype: [(64, 64, 4, 2), (32, 32, 4, 1)])
    dkdv = _TooBig(pa._bwd_dkdv_kernel, when=lambda args: args[1].dim() == 3)  # K = k_p: the prompt pass
    monkeypatch.setattr(pa, "_bwd_dkdv_kernel", dkdv)
    inputs, do = make_inputs(rng, 3, 2, 20, 6, 16)
    check_all(rng, inputs, do, torch.float32, deterministic=deterministic)
    # image pass and prompt pass with 64 (the prompt pass fails), then both again with 32
    assert dkdv.blocks == [(64, 64), (64, 64), (32, 32), (32, 32)]
    dkdv.blocks.clear()
    check_all(rng, inputs, do, torch.float32, deterministic=deterministic)
    assert dkdv.blocks == [(32, 32), (32, 32)]


def test_pinned_forward_falls_back_to_smaller_blocks(monkeypatch, rng):
    monkeypatch.setattr(pa, "_FITS", {})
    monkeypatch.setattr(pa, "_fwd_pinned", lambda block_d, dtype: [(64, 64, 4, 2), (32, 32, 4, 1)])
    fwd = _TooBig(pa._fwd_kernel)
    monkeypatch.setattr(pa, "_fwd_kernel", fwd)
    inputs, do = make_inputs(rng, 2, 2, 17, 3, 16)
    check_all(rng, inputs, do, torch.float32)
    assert fwd.blocks == [(64, 64), (32, 32)]
    with pytest.raises(OutOfResources):  # the last config's error propagates
        monkeypatch.setattr(pa, "_FITS", {})
        monkeypatch.setattr(pa, "_fwd_pinned", lambda block_d, dtype: [(64, 64, 4, 2)])
        pa.prompt_attention(*inputs)


def test_config_choices(monkeypatch):
    """On a GPU: fp32 at a head dim padded past 64 (d = 80) starts without pipelining; every list ends
    with a small fallback; the deterministic forward is one pinned config, not the autotuned set."""
    monkeypatch.setattr(pa, "INTERPRET", False)
    for pick in (pa._bwd_configs, pa._fwd_pinned):
        assert pick(128, torch.float32)[0][3] == 1
        assert pick(64, torch.float16)[0] == (64, 64, 4, 2)
        for block_d in (16, 64, 128):
            for dtype in (torch.float16, torch.float32):
                cfgs = pick(block_d, dtype)
                assert cfgs[-1] == (32, 32, 4, 1)
                assert all(a[0] * a[1] * a[3] >= b[0] * b[1] * b[3] for a, b in zip(cfgs, cfgs[1:]))


def test_prompt_programs_follow_the_device(monkeypatch):
    """Two programs per SM of the current CUDA device; a few under the interpreter / on the CPU."""
    assert common.sm_count(torch.device("cpu")) is None
    assert pa._prompt_programs(torch.device("cpu")) == pa._INTERPRET_PROGRAMS
    monkeypatch.setattr(pa, "INTERPRET", False)
    monkeypatch.setattr(pa, "sm_count", lambda device: 132)  # an H100
    assert pa._prompt_programs(torch.device("cuda", 0)) == 264
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert common.sm_count(torch.device("cuda", 0)) == sms
        assert common.sm_count(torch.device("cuda")) == torch.cuda.get_device_properties(
            torch.cuda.current_device()).multi_processor_count


def test_kernels_import_nothing_from_their_callers():
    """kernels/ stands alone: its modules import only the standard library, torch, triton and each other."""
    allowed = {"torch", "triton", "functools", "importlib", "os", "math"}
    for path in sorted((Path(__file__).parents[1] / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [] if node.level else [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path.name}: imports {roots}"


@pytest.mark.parametrize("case, match", [
    ("not_tensor", "must be torch tensors"),
    ("k_shape", "share one"),
    ("p_heads", r"\(H, b, d\)"),
    ("p_batched", r"\(H, b, d\)"),
    ("dtype_mix", "one dtype"),
    ("int_dtype", "one dtype"),
    ("device", "device|TRITON_INTERPRET"),
])
def test_bad_inputs_raise_value_error(case, match, rng):
    (q, k, v, k_p, v_p), _ = make_inputs(rng, 1, 2, 5, 3, 16)
    if case == "not_tensor":
        k_p = k_p.tolist()
    elif case == "k_shape":
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
