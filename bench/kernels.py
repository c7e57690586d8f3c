"""Benchmark of the Triton kernels against their torch equivalents.

    python -m bench.kernels [--out results.json] [--batches 32 256] [--dtypes float32 float16 bfloat16]

On CUDA: median times (triton.testing.do_bench, return_mode="median") of
- prompt attention, forward and forward+backward, vs torch SDPA over torch.cat([k, k_p.expand(B, ...)]),
  eager and torch.compile'd,
  for ViT-B/32 (N=50) and ViT-B/16 (N=197) blocks: H=12, d=64, b=50 prompt tokens;
- the fused RVPT loss (forward computes the gradients; + backward) vs the torch composition,
  P=9, W=768, E=512, K=1000;
with achieved TFLOP/s and GB/s (from the counts below, with each dtype's element size; derived in
kernels/README.md) next to the device's peak; a row whose error against torch is past TOLERANCE fails
the run (exit 1). Without CUDA it says so, runs a tiny interpreter smoke test and exits 0 (1 on a mismatch).
"""
import argparse
import json
import math
import os
import sys
import tempfile

import torch

# Dense fp16/bf16 tensor-core peak and HBM bandwidth (SXM parts), by device-name substring.
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}
VIT = {"ViT-B/32": 50, "ViT-B/16": 197}  # image tokens per prompted block (class token included)
H, D, NP = 12, 64, 50
LOSS = dict(P=9, W=768, E=512, K=1000)


def attention_flops(B, N, b=NP, h=H, d=D, backward=False):
    """Matmul FLOPs: forward QK^T and PV (2 x 2*N*(N+b)*d per head); the backward recomputes S and
    does dV, dP, dQ, dK (5 x 2*N*(N+b)*d)."""
    per = 2 * N * (N + b) * d
    return B * h * per * (2 + (5 if backward else 0))


def attention_bytes(B, N, b=NP, h=H, d=D, elt=2, backward=False):
    """Least HBM traffic: every tensor read or written once, prompt K/V once (not B times)."""
    x = B * h * N * d * elt  # one of q, k, v, o, dO, dq, dk, dv
    p = h * b * d * elt  # one of k_p, v_p
    rows = B * h * N * 4  # one fp32 row vector (lse, delta)
    fwd = 4 * x + 2 * p + rows  # q, k, v, k_p, v_p in; o, lse out
    if not backward:
        return fwd
    # fp32 partial of dk_p or dv_p per group of images (kernels.prompt_attention._image_groups, H100)
    groups = math.ceil(B / math.ceil(B / min(B, 264 // (h * math.ceil(b / 64)))))
    part = groups * h * b * d * 4
    # read q k v o dO k_p v_p lse; delta out+in (read twice); write dq dk dv; partials out+in; dk_p dv_p
    bwd = 5 * x + 2 * p + rows + 3 * rows + 3 * x + 2 * 2 * part + 2 * p
    return fwd + bwd


def loss_flops(B, P, W, E, K):
    """logits and sum_k p_k T_k: 2 x 2*K*E per sample; cosines + their gradients ~ 12*P*W."""
    return B * (4 * K * E + 12 * P * W)


def loss_bytes(B, P, W, E, K, elt=2):
    """c, s, z, text (once), labels in; fp32 dc, dz and per-sample loss out."""
    return 2 * B * P * W * elt + B * E * elt + K * E * elt + 8 * B + 4 * B * P * W + 4 * B * E + 4 * B


def _peaks():
    name = torch.cuda.get_device_name()
    for key, peak in PEAKS.items():
        if key in name:
            return name, peak
    return name, (None, None)


def _attention_inputs(B, N, dtype, device):
    # The engine's layout: q, k, v are views of one (B, N, 3, H, d) projection; k_p, v_p of (b, 2, H, d).
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype)
    kv_p = torch.randn(NP, 2, H, D, device=device, dtype=dtype)
    views = [*qkv.permute(2, 0, 3, 1, 4).unbind(0), *kv_p.permute(1, 2, 0, 3).unbind(0)]
    return [t.requires_grad_() for t in views]  # strided leaves


def _sdpa(q, k, v, k_p, v_p):
    B = q.shape[0]
    k = torch.cat([k, k_p.unsqueeze(0).expand(B, -1, -1, -1)], dim=2)
    v = torch.cat([v, v_p.unsqueeze(0).expand(B, -1, -1, -1)], dim=2)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


# max |kernel - torch| relative to max |torch| past which a row fails (bench exits 1)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _row(kind, shape, dtype, ms, ms_torch, flops, nbytes, peak, ms_compiled=None):
    t = ms * 1e-3
    row = dict(kernel=kind, shape=shape, dtype=str(dtype).replace("torch.", ""), ms=ms, ms_torch=ms_torch,
               ms_torch_compiled=ms_compiled, speedup=ms_torch / ms,
               speedup_vs_compiled=None if ms_compiled is None else ms_compiled / ms,
               tflops=flops / t / 1e12, gbs=nbytes / t / 1e9,
               floor_ms=None if peak[0] is None else 1e3 * max(flops / peak[0], nbytes / peak[1]))
    print(f"{kind:<22} {shape:<34} {row['dtype']:<8} {ms * 1e3:8.1f} us  torch {ms_torch * 1e3:8.1f} us  "
          f"x{row['speedup']:5.2f}  {row['tflops']:6.1f} TFLOP/s  {row['gbs']:7.1f} GB/s"
          + ("" if row["floor_ms"] is None else f"  floor {row['floor_ms'] * 1e3:6.1f} us"))
    return row


def bench_cuda(batches, dtypes, device="cuda"):
    """Median times (do_bench's return_mode="median") of each kernel, torch eager and torch.compile."""
    from functools import partial

    from triton.testing import do_bench as _do_bench
    do_bench = partial(_do_bench, return_mode="median")
    sdpa_compiled = torch.compile(_sdpa)

    from kernels.prompt_attention import prompt_attention
    from kernels.repel_loss import repel_ce_loss, repel_ce_loss_reference

    dev = torch.device(device)
    name, peak = _peaks()
    print(f"device: {name}; peak {peak[0] and peak[0] / 1e12} TFLOP/s dense 16-bit, "
          f"{peak[1] and peak[1] / 1e12} TB/s HBM")
    rows = []
    for dtype in dtypes:
        for vit, N in VIT.items():
            for B in batches:
                x = _attention_inputs(B, N, dtype, dev)
                do = torch.randn(B, H, N, D, device=dev, dtype=dtype)
                elt = dtype.itemsize
                err = _rel(prompt_attention(*x), _sdpa(*x))
                grad_err = max(_rel(a, b) for a, b in zip(torch.autograd.grad(prompt_attention(*x), x, do),
                                                          torch.autograd.grad(_sdpa(*x), x, do)))
                shape = f"{vit} B={B} H={H} N={N} b={NP} d={D}"
                with torch.no_grad():
                    f_ms = do_bench(lambda: prompt_attention(*x))
                    f_ref = do_bench(lambda: _sdpa(*x))
                    f_cmp = do_bench(lambda: sdpa_compiled(*x))
                fb_ms = do_bench(lambda: torch.autograd.grad(prompt_attention(*x), x, do))
                fb_ref = do_bench(lambda: torch.autograd.grad(_sdpa(*x), x, do))
                fb_cmp = do_bench(lambda: torch.autograd.grad(sdpa_compiled(*x), x, do))
                rows.append(_row("attention fwd", shape, dtype, f_ms, f_ref, attention_flops(B, N),
                                 attention_bytes(B, N, elt=elt), peak, f_cmp)
                            | {"rel_err_vs_sdpa": err, "ok": err <= TOLERANCE[dtype]})
                rows.append(_row("attention fwd+bwd", shape, dtype, fb_ms, fb_ref,
                                 attention_flops(B, N, backward=True), attention_bytes(B, N, elt=elt, backward=True),
                                 peak, fb_cmp) | {"grad_rel_err_vs_sdpa": grad_err, "ok": grad_err <= TOLERANCE[dtype]})
        for B in batches:
            P, W, E, K = LOSS["P"], LOSS["W"], LOSS["E"], LOSS["K"]
            c = torch.randn(B, P, W, device=dev, dtype=dtype, requires_grad=True)
            s = torch.randn(B, P, W, device=dev, dtype=dtype)
            z = torch.randn(B, E, device=dev, dtype=dtype, requires_grad=True)
            text = torch.nn.functional.normalize(torch.randn(K, E, device=dev), dim=-1).to(dtype)
            y = torch.randint(0, K, (B,), device=dev)
            args = (c, s, z, text, 100.0, y, 2.0)
            err = _rel(repel_ce_loss(*args), repel_ce_loss_reference(*args))
            ms = do_bench(lambda: torch.autograd.grad(repel_ce_loss(*args), [c, z]))
            ms_ref = do_bench(lambda: torch.autograd.grad(repel_ce_loss_reference(*args), [c, z]))
            ref_compiled = torch.compile(repel_ce_loss_reference)
            ms_cmp = do_bench(lambda: torch.autograd.grad(ref_compiled(*args), [c, z]))
            rows.append(_row("repel_ce_loss fwd+bwd", f"B={B} P={P} W={W} E={E} K={K}", dtype, ms, ms_ref,
                             loss_flops(B, P, W, E, K), loss_bytes(B, P, W, E, K, elt=dtype.itemsize), peak, ms_cmp)
                        | {"rel_err_vs_torch": err, "ok": err <= TOLERANCE[dtype]})
    return dict(cuda=True, device=name, peak_tflops=peak[0] and peak[0] / 1e12,
                peak_tbs=peak[1] and peak[1] / 1e12, torch=torch.__version__, results=rows)


def smoke_cpu():
    """Tiny shapes under the Triton interpreter: the kernels run and match the references."""
    from kernels.prompt_attention import prompt_attention, prompt_attention_reference
    from kernels.repel_loss import repel_ce_loss, repel_ce_loss_reference

    torch.manual_seed(0)
    x = [torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3)]
    x += [torch.randn(2, 5, 16, requires_grad=True) for _ in range(2)]
    got = torch.autograd.grad(prompt_attention(*x).square().sum(), x)
    want = torch.autograd.grad(prompt_attention_reference(*x).square().sum(), x)
    err_attn = max((a - b).abs().max().item() for a, b in zip(got, want))
    c, z = torch.randn(3, 2, 24, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    args = (torch.randn(3, 2, 24), torch.nn.functional.normalize(torch.randn(6, 8), dim=-1), 30.0,
            torch.randint(0, 6, (3,)), 2.0, 0.0)
    got = torch.autograd.grad(repel_ce_loss(c, args[0], z, *args[1:]), [c, z])
    want = torch.autograd.grad(repel_ce_loss_reference(c, args[0], z, *args[1:]), [c, z])
    err_loss = max((a - b).abs().max().item() for a, b in zip(got, want))
    ok = err_attn < 1e-4 and err_loss < 1e-4
    print(f"interpreter smoke run: prompt_attention grads max err {err_attn:.2e}, "
          f"repel_ce_loss grads max err {err_loss:.2e}: {'OK' if ok else 'MISMATCH'}")
    return ok, dict(cuda=False, smoke_ok=ok, attention_max_err=err_attn, loss_max_err=err_loss)


def write_json(path, data):
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kernels-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"],
                    choices=["float16", "bfloat16", "float32"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        # Before triton is first imported: its own library functions are @triton.jit too.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed: nothing to benchmark")
        return 0
    if torch.cuda.is_available():
        data = bench_cuda(args.batches, [getattr(torch, d) for d in args.dtypes])
        bad = [r for r in data["results"] if not r["ok"]]
        for r in bad:
            print(f"PAST TOLERANCE: {r['kernel']} {r['shape']} {r['dtype']}")
        code = 1 if bad else 0
    else:
        print("no CUDA device: GPU timings skipped (see kernels/README.md for the predicted floors)")
        ok, data = smoke_cpu()
        code = 0 if ok else 1
    if args.out:
        write_json(args.out, data)
        print(f"wrote {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
