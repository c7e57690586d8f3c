"""One RVPT training step (forward + backward + SGD step), `naive` vs `shared` prompted ViT, in fp32 and
bf16 (`--precision bf16`: frozen weights stored in bf16, prompts and loss fp32).

    python -m bench.tune_step                      # ViT-B-32 (random weights, 224 px, b=50, D=3, batch 32) + lab
    python -m bench.tune_step --batch 8 --reps 3   # quicker
    python -m bench.tune_step --precisions fp32    # fp32 only

Both implementations are timed round-robin in one run, so the ratio is fair on a noisy machine.
Writes JSON (default bench/results/tune_step.json)."""
import argparse
from pathlib import Path

import torch

from engine import precision as P
from engine import prompted_vit
from engine.defenses.rvpt import default_config, rvpt_step_loss
from engine.io import atomic_path, write_json
from engine.models import load_model

from .common import command, interleaved_medians, machine

MODELS = ("ViT-B-32", "lab-vit")


def bench_model(name, batch, reps, backends, device, precisions=("fp32",)):
    clip = load_model(name, device=device)
    cfg = default_config(name)
    torch.manual_seed(0)
    x = torch.rand(batch, 3, clip.image_size, clip.image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    text = torch.nn.functional.normalize(torch.randn(10, clip.model.text_projection.shape[1], device=device), dim=-1)
    prompts = prompted_vit.VisualPrompts.for_visual(clip.visual, cfg.start, cfg.tokens).to(device)
    opt = torch.optim.SGD(prompts.parameters(), lr=cfg.lr, momentum=0.9)

    def loss_and_grad(backend, prec):
        with P.run(prec, device, clip.model):   # the backward too: it reads the bf16 weights the forward saved
            loss = rvpt_step_loss(clip, prompts, x, y, text, cfg, backend)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        return loss.detach().float(), torch.cat([p.grad.flatten() for p in prompts.parameters()])

    def step(backend, prec):
        def fn():
            loss_and_grad(backend, prec)
            opt.step()
        return fn
    # step 1's loss and prompt gradient in each precision, from the same prompts (before any timed step)
    first = {prec: loss_and_grad("shared", prec) for prec in precisions}
    calls = {f"{b} {prec}" if len(precisions) > 1 else b: step(b, prec) for prec in precisions for b in backends}
    med, raw = interleaved_medians(calls, reps, device=device)
    row = {"model": name, "batch": batch, "image_size": clip.image_size, "prompt_tokens": cfg.tokens,
           "prompt_start": cfg.start, "blocks": len(clip.visual.transformer.resblocks),
           "median_s": med, "all_s": raw, "images_per_s": {b: batch / t for b, t in med.items()}}
    key = lambda b, prec="fp32": f"{b} {prec}" if len(precisions) > 1 else b  # noqa: E731
    if "naive" in backends and "shared" in backends:
        row["speedup_shared_vs_naive"] = med[key("naive")] / med[key("shared")]
    for prec in precisions[1:]:
        (l0, g0), (l1, g1) = first["fp32"], first[prec]
        row[prec] = {"speedup_shared_vs_fp32_shared": med[key("shared")] / med[key("shared", prec)],
                     "speedup_shared_vs_fp32_naive": med[key("naive")] / med[key("shared", prec)] if "naive" in backends else None,
                     "step1_loss_rel_diff": abs(l1 - l0).item() / abs(l0).item(),
                     "step1_grad_rel_diff": ((g1 - g0).norm() / g0.norm()).item()}
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=32, help="ViT-B-32 batch (the lab model always uses 32)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"],
                   help="fp32 first: the others are compared with it")
    p.add_argument("--out", default="bench/results/tune_step.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backends = ["naive", "shared"] + (["triton"] if device.type == "cuda" else [])
    rows = []
    for name in args.models:
        if args.precisions[0] != "fp32":
            raise SystemExit("--precisions: list fp32 first (the others are compared with it)")
        rows.append(bench_model(name, args.batch if name == "ViT-B-32" else 32, args.reps, backends, device,
                                tuple(args.precisions)))
        r = rows[-1]
        times = "  ".join(f"{b} {t * 1000:.0f} ms" for b, t in r["median_s"].items())
        print(f"{name:<9} batch {r['batch']:>3}: {times}  -> shared is {r['speedup_shared_vs_naive']:.2f}x naive")
    write_json(args.out, {"benchmark": "rvpt tune step (fwd+bwd+SGD), median of interleaved reps",
                          "command": command("bench.tune_step", argv), "machine": machine(),
                          "reps": args.reps, "results": rows})
    md = ["| model | batch | step | ms/step | vs fp32 naive | vs fp32 shared |", "|---|---|---|---|---|---|"]
    for r in rows:
        ref = r["median_s"]
        naive = ref.get("naive fp32", ref.get("naive"))
        shared = ref.get("shared fp32", ref.get("shared"))
        md += [f"| {r['model']} ({r['image_size']} px, b={r['prompt_tokens']}, D={r['prompt_start']}) | {r['batch']} | "
               f"{k} | {t * 1000:.0f} | {naive / t:.2f}x | {shared / t:.2f}x |" for k, t in ref.items()]
    for r in rows:
        for prec in args.precisions[1:]:
            q = r[prec]
            md.append(f"\n{r['model']} {prec}: step-1 loss {100 * q['step1_loss_rel_diff']:.2f}% and prompt gradient "
                      f"{100 * q['step1_grad_rel_diff']:.2f}% (relative L2) from fp32.")
    with atomic_path(Path(args.out).with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
