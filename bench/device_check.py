"""The GPU check, one command on a fresh H100/H200 (bench/device_check.sh installs and calls it):

    python -m bench.device_check --out bench/results/device_check.json

1. Every kernel config (each forward config, autotuned and pinned, and each backward config) of the
   prompt-attention op, at the lab, ViT-B/32 and ViT-B/16 block shapes, in fp32 / fp16 / bf16, deterministic
   and atomic: the output and every gradient (q, k, v, k_p, v_p) against an fp64 torch reference.
2. The fused repel + CE loss at the ViT-B/32 RVPT shape: loss and every gradient against fp64.
3. Times: bench.kernels (the kernels vs SDPA over the concatenation, eager and torch.compile) and
   bench.tune_step (one RVPT step, naive / shared / triton, fp32 and bf16).
Writes one JSON; exits 1 if any error is past its tolerance. Without CUDA it says so and exits 2.
Nothing here has run on a GPU yet (this project's machines have none): README "Verified where"."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

# (name, B, H, N, b, d): the lab CLIP (32 px, patch 8, width 128, head 32), ViT-B/32 and ViT-B/16 blocks
SHAPES = [("lab", 32, 4, 17, 16, 32), ("ViT-B/32", 32, 12, 50, 50, 64), ("ViT-B/16", 8, 12, 197, 50, 64)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# largest error relative to the fp64 output's / gradient's max magnitude
TOLERANCE = {"fp32": 2e-5, "fp16": 2e-2, "bf16": 6e-2}
SEED = 0


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def attention_inputs(B, H, N, b, d, dtype, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype).requires_grad_(True)  # noqa: E731
    return mk(B, H, N, d), mk(B, H, N, d), mk(B, H, N, d), mk(H, b, d), mk(H, b, d)


def fp64_reference(q, k, v, k_p, v_p, do):
    from kernels.reference import prompt_attention_reference
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, k_p, v_p)]
    o = prompt_attention_reference(*leaves)
    o.backward(do.double())
    return o.detach(), [t.grad for t in leaves]


def check_attention_configs(shapes=SHAPES, dtypes=DTYPES, device="cuda"):
    """Every config of every pass, launched directly, against fp64 (tests run it on the CPU under the
    Triton interpreter, at a tiny shape)."""
    from kernels import prompt_attention as PA
    rows = []
    for name, B, H, N, b, d in shapes:
        for dname, dtype in dtypes.items():
            q, k, v, k_p, v_p = attention_inputs(B, H, N, b, d, dtype, SEED, device)
            do = torch.randn_like(q)
            o64, g64 = fp64_reference(q, k, v, k_p, v_p, do)
            scale = d ** -0.5
            block_d = PA._block_d(d)
            fwd = sorted(set(PA._FWD_TUNED) | set(PA._fwd_pinned(block_d, dtype)))
            for cfg in fwd:
                o, lse = PA._forward_with(cfg, q, k, v, k_p, v_p, scale)
                rows.append(_row("fwd", name, dname, cfg, None, {"o": rel_err(o, o64)}, TOLERANCE[dname]))
            o, lse = PA._forward_with(PA._fwd_pinned(block_d, dtype)[0], q, k, v, k_p, v_p, scale)
            for cfg in PA._bwd_configs(block_d, dtype):
                for det in (True, False):
                    try:
                        grads = PA._backward_with(cfg, do, q, k, v, k_p, v_p, o, lse, scale, det, (True,) * 5)
                    except Exception as e:   # a config that does not fit this device: recorded, not fatal
                        rows.append({"pass": "bwd", "shape": name, "dtype": dname, "config": cfg,
                                     "deterministic": det, "skipped": f"{type(e).__name__}: {e}"[:200]})
                        continue
                    errs = {n: rel_err(gr, w) for n, gr, w in zip(("dq", "dk", "dv", "dk_p", "dv_p"), grads, g64)}
                    rows.append(_row("bwd", name, dname, cfg, det, errs, TOLERANCE[dname]))
            # the public op end to end (autograd, pinned configs and the first-fit fallback)
            for det in (True, False):
                out = PA.prompt_attention(q, k, v, k_p, v_p, deterministic=det)
                grads = torch.autograd.grad(out, (q, k, v, k_p, v_p), do)
                errs = {"o": rel_err(out, o64), **{n: rel_err(gr, w) for n, gr, w in
                                                   zip(("dq", "dk", "dv", "dk_p", "dv_p"), grads, g64)}}
                rows.append(_row("op", name, dname, None, det, errs, TOLERANCE[dname]))
    return rows


def _row(kind, shape, dtype, cfg, det, errs, tol):
    return {"pass": kind, "shape": shape, "dtype": dtype, "config": cfg, "deterministic": det,
            "errors": errs, "tolerance": tol, "ok": all(e <= tol for e in errs.values())}


def check_repel_loss():
    from kernels.reference import repel_ce_loss_reference
    from kernels.repel_loss import repel_ce_loss
    rows = []
    B, P, W, E, K = 32, 9, 768, 512, 1000
    for dname, dtype in DTYPES.items():
        g = torch.Generator(device="cuda").manual_seed(SEED)
        mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
        c, s, z = mk(B, P, W).requires_grad_(True), mk(B, P, W), mk(B, E).requires_grad_(True)
        text = torch.nn.functional.normalize(mk(K, E).float(), dim=-1).to(dtype)
        labels = torch.randint(0, K, (B,), generator=g, device="cuda")
        loss = repel_ce_loss(c, s, z, text, 100.0, labels)
        dc, dz = torch.autograd.grad(loss, (c, z))
        c64, z64 = c.detach().double().requires_grad_(True), z.detach().double().requires_grad_(True)
        ref = repel_ce_loss_reference(c64, s.double(), z64, text.double(), 100.0, labels)
        rc, rz = torch.autograd.grad(ref, (c64, z64))
        errs = {"loss": abs(loss.item() - ref.item()) / abs(ref.item()), "dc": rel_err(dc, rc), "dz": rel_err(dz, rz)}
        rows.append(_row("repel_ce", "ViT-B/32 RVPT", dname, None, None, errs, TOLERANCE[dname]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/device_check.json")
    p.add_argument("--skip-timing", action="store_true", help="only the correctness checks")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("device_check needs a CUDA GPU; this machine has none (the kernels' CPU checks: make test)")
        return 2
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
              "torch": torch.__version__, "seed": SEED}
    import triton
    result["triton"] = triton.__version__
    result["attention"] = check_attention_configs()
    result["repel_ce"] = check_repel_loss()
    print(f"correctness: {time.time() - t0:.0f} s")
    if not args.skip_timing:
        from . import kernels as bench_kernels
        from . import tune_step
        out = Path(args.out)
        bench_kernels.main(["--out", str(out.with_name(out.stem + "_kernels.json")),
                            "--dtypes", "float32", "float16", "bfloat16", "--batches", "32", "256"])
        tune_step.main(["--models", "ViT-B-32", "--precisions", "fp32", "bf16", "--reps", "5",
                        "--out", str(out.with_name(out.stem + "_tune_step.json"))])
        result["timing_files"] = [out.stem + "_kernels.json", out.stem + "_tune_step.json"]
    failed = [r for r in result["attention"] + result["repel_ce"] if r.get("ok") is False]
    result["failed"], result["seconds"] = len(failed), round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in failed:
        print(f"PAST TOLERANCE: {r['pass']} {r['shape']} {r['dtype']} config {r['config']} det {r['deterministic']}: "
              + ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items()) + f" (tolerance {r['tolerance']})")
    print(f"{len(failed)} past tolerance; wrote {args.out} in {result['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
