"""One RVPT training step (forward + backward + SGD step), `naive` vs `shared` prompted ViT.

    python -m bench.tune_step                      # ViT-B-32 (random weights, 224 px, b=50, D=3, batch 32) + lab
    python -m bench.tune_step --batch 8 --reps 3   # quicker

Both implementations are timed round-robin in one run, so the ratio is fair on a noisy machine.
Writes JSON (default bench/results/tune_step.json)."""
import argparse
from pathlib import Path

import torch

from engine import prompted_vit
from engine.defenses.rvpt import default_config, rvpt_step_loss
from engine.io import atomic_path, write_json
from engine.models import load_model

from .common import command, interleaved_medians, machine

MODELS = ("ViT-B-32", "lab-vit")


def bench_model(name, batch, reps, backends, device):
    clip = load_model(name, device=device)
    cfg = default_config(name)
    torch.manual_seed(0)
    x = torch.rand(batch, 3, clip.image_size, clip.image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    text = torch.nn.functional.normalize(torch.randn(10, clip.model.text_projection.shape[1], device=device), dim=-1)
    prompts = prompted_vit.VisualPrompts.for_visual(clip.visual, cfg.start, cfg.tokens).to(device)
    opt = torch.optim.SGD(prompts.parameters(), lr=cfg.lr, momentum=0.9)

    def step(backend):
        def fn():
            loss = rvpt_step_loss(clip, prompts, x, y, text, cfg, backend)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return fn
    med, raw = interleaved_medians({b: step(b) for b in backends}, reps, device=device)
    row = {"model": name, "batch": batch, "image_size": clip.image_size, "prompt_tokens": cfg.tokens,
           "prompt_start": cfg.start, "blocks": len(clip.visual.transformer.resblocks),
           "median_s": med, "all_s": raw, "images_per_s": {b: batch / t for b, t in med.items()}}
    if "naive" in med and "shared" in med:
        row["speedup_shared_vs_naive"] = med["naive"] / med["shared"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=32, help="ViT-B-32 batch (the lab model always uses 32)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/results/tune_step.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backends = ["naive", "shared"] + (["triton"] if device.type == "cuda" else [])
    rows = []
    for name in args.models:
        rows.append(bench_model(name, args.batch if name == "ViT-B-32" else 32, args.reps, backends, device))
        r = rows[-1]
        times = "  ".join(f"{b} {t * 1000:.0f} ms" for b, t in r["median_s"].items())
        print(f"{name:<9} batch {r['batch']:>3}: {times}  -> shared is {r['speedup_shared_vs_naive']:.2f}x naive")
    write_json(args.out, {"benchmark": "rvpt tune step (fwd+bwd+SGD), median of interleaved reps",
                          "command": command("bench.tune_step", argv), "machine": machine(),
                          "reps": args.reps, "results": rows})
    md = ["| model | batch | naive ms/step | shared ms/step | shared speed-up |", "|---|---|---|---|---|"]
    md += [f"| {r['model']} ({r['image_size']} px, b={r['prompt_tokens']}, D={r['prompt_start']}) | {r['batch']} | "
           f"{r['median_s']['naive'] * 1000:.0f} | {r['median_s']['shared'] * 1000:.0f} | "
           f"{r['speedup_shared_vs_naive']:.2f}x |" for r in rows]
    with atomic_path(Path(args.out).with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
