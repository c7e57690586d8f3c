"""kernels.repel_ce_loss against the torch reference (kernels.reference): the loss and the gradients
w.r.t. c and z. Tolerance rule, the interpreter set-up and the seeded inputs: tests/kernel_helpers.py."""
import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernel_helpers import DEVICE, DTYPES, SKIP_REASON, poison_buffers, rng  # noqa: E402,F401

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from kernels.reference import repel_ce_loss_reference as reference  # noqa: E402

rl = importlib.import_module("kernels.repel_loss")

# Floors on top of the 2x rule, per dtype (scaled by the magnitude of the reference, see above).
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    poison_buffers(monkeypatch)


def make_inputs(rng, B, P, W, E, K):
    """Fresh inputs from the test's generator: [c, s, z, text] on DEVICE and the labels."""
    c = rng.randn(B, P, W)
    s = 0.5 * c + rng.randn(B, P, W)  # correlated, so cos spreads on both sides of 0
    z = 3 * rng.randn(B, E)
    text = F.normalize(rng.randn(K, E), dim=-1)
    labels = rng.randint(K, (B,))
    return [t.to(DEVICE) for t in (c, s, z, text)], labels.to(DEVICE)


def run(fn, floats, labels, dtype, scale=30.0, alpha=2.0, margin=None, device=DEVICE):
    c, s, z, text = (t.detach().to(device, dtype) for t in floats)
    c.requires_grad_()
    z.requires_grad_()
    loss = fn(c, s, z, text, scale, labels.to(device), alpha, margin)
    dc, dz = torch.autograd.grad(loss, [c, z])
    return loss, dc, dz


def check_all(rng, floats, labels, dtype, **kw):
    """The loss and both gradients against the fp64 reference (2x rule)."""
    floats = [t.to(dtype) for t in floats]  # the fp64 reference sees the same (rounded) inputs
    got = run(rl.repel_ce_loss, floats, labels, dtype, **kw)
    same = run(reference, floats, labels, dtype, **kw)
    exact = run(reference, floats, labels, torch.float64, device="cpu", **kw)
    assert got[0].dim() == 0 and got[1].dtype == dtype and got[2].dtype == dtype, str(rng)
    for name, g, base, want in zip(["loss", "dc", "dz"], got, same, exact):
        where = f"{name} ({dtype}, {rng})"
        assert torch.isfinite(g).all(), f"{where}: non-finite values (unwritten output?)"
        err = (g.double().cpu() - want).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, want.abs().max().item())
        tol = 2 * (base.double().cpu() - want).abs().max().item() + floor
        assert err <= tol, f"{where}: max error {err:.3g} > tolerance {tol:.3g}"
    return got


# (B, P, W, E, K): W, E not powers of two; K = 70 spans three 32-class blocks with a ragged tail.
SHAPES = [(3, 2, 20, 12, 10), (6, 3, 33, 20, 70)]


@pytest.mark.parametrize("margin", [None, 0.0], ids=["no_margin", "margin0"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}P{}W{}E{}K{}".format(*s))
def test_matches_reference(shape, dtype, margin, rng):
    floats, labels = make_inputs(rng, *shape)
    check_all(rng, floats, labels, dtype, margin=margin)


def test_margin_clamps_some_samples_only(rng):
    """margin = 0 must clamp some samples (dc = 0) and leave others: both branches run."""
    floats, labels = make_inputs(rng, 8, 3, 24, 16, 12)
    floats[1][:4] = -floats[0][:4]  # samples 0-3: cos = -1 < 0, clamped
    floats[1][4:] = floats[0][4:] + 0.5 * floats[1][4:]  # samples 4-7: cos > 0, not clamped
    _, dc, _ = check_all(rng, floats, labels, torch.float32, margin=0.0)
    assert (dc[:4] == 0).all() and (dc[4:].abs().sum((1, 2)) > 0).all(), str(rng)


def test_tensor_scale_strided_inputs_and_grad_scaling(rng):
    B, P, W, E, K = 4, 3, 16, 8, 5
    c = rng.randn(B, W, P).to(DEVICE).transpose(1, 2).requires_grad_()  # non-contiguous
    s = rng.randn(B, P, W).to(DEVICE)
    zz = rng.randn(B, 2 * E).to(DEVICE)
    z = zz[:, ::2].detach().requires_grad_()  # non-contiguous (stride 2)
    text = F.normalize(rng.randn(K, E), dim=-1).to(DEVICE)
    labels = rng.randint(K, (B,)).to(DEVICE, torch.int32)
    loss = rl.repel_ce_loss(c, s, z, text, torch.tensor(20.0), labels, alpha=1.5)
    (3 * loss).backward()
    c2, z2 = c.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    want = reference(c2, s, z2, text, 20.0, labels.long(), alpha=1.5)
    (3 * want).backward()
    # fp32 defaults of assert_close (rtol 1.3e-6, atol 1e-5): a fixed atol of 1e-6 failed now and then
    msg = lambda m: f"{m}\n{rng}"
    torch.testing.assert_close(loss, want, msg=msg)
    torch.testing.assert_close(c.grad, c2.grad, msg=msg)
    torch.testing.assert_close(z.grad, z2.grad, msg=msg)


def test_bit_reproducible(rng):
    floats, labels = make_inputs(rng, 5, 2, 20, 12, 10)
    a = check_all(rng, floats, labels, torch.float32)
    b = run(rl.repel_ce_loss, floats, labels, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), str(rng)


@pytest.mark.parametrize("case, match", [
    ("not_tensor", "must be torch tensors"),
    ("s_shape", "share one"),
    ("z_batch", "z must be"),
    ("text_dim", "text must be"),
    ("labels_shape", "labels must be"),
    ("labels_float", "labels must be int64"),
    ("int_c", "c must be float16"),
    ("device", "device|TRITON_INTERPRET"),
])
def test_bad_inputs_raise_value_error(case, match, rng):
    (c, s, z, text), labels = make_inputs(rng, 2, 2, 8, 6, 4)
    if case == "not_tensor":
        labels = labels.tolist()
    elif case == "s_shape":
        s = s[:, :1]
    elif case == "z_batch":
        z = z[:1]
    elif case == "text_dim":
        text = text[:, :5]
    elif case == "labels_shape":
        labels = labels[:, None]
    elif case == "labels_float":
        labels = labels.float()
    elif case == "int_c":
        c = c.long()
    elif case == "device":
        z = z.to("meta") if DEVICE == "cpu" else z.cpu()
    with pytest.raises(ValueError, match=match):
        rl.repel_ce_loss(c, s, z, text, 100.0, labels)
