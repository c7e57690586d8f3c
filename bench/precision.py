"""Evaluation in bf16 (`--precision bf16`: the frozen weights stored in bf16 under torch.autocast, on AMX /
AVX512-BF16 CPUs) against fp32, side by side in one run:
images/s on ViT-B-32 (random weights: speed only) and CA/ASR of every bundled lab model (lab CLIP on
Fashion-MNIST) in both precisions.

    python -m bench.precision                     # 10,000 test images per lab model
    python -m bench.precision --images 1000 --quick

Writes bench/results/precision.json and .md."""
import argparse
import time
from pathlib import Path

import torch

from engine import manifest
from engine import precision as P
from engine.evaluate import features
from engine.io import atomic_path, write_json
from engine.job import JobConfig, measure, prepare
from engine.models import load_model

from .common import command, interleaved_medians, machine


def throughput(model_name, batch, reps):
    """images/s of the image tower: fp32, bf16 (what --precision bf16 runs: weights stored in bf16 under
    autocast) and bf16 autocast alone over the fp32 weights (each call casts every weight)."""
    clip = load_model(model_name)
    x = torch.rand(batch, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    calls = {p: (lambda p=p: _features(clip, x, p, device)) for p in ("fp32", "bf16")}
    calls["bf16 autocast only"] = lambda: _features(clip, x, "bf16", device, store=False)
    medians, _ = interleaved_medians(calls, reps, warmup=2, device=device)
    return {p: batch / medians[p] for p in calls}


def _features(clip, x, precision, device, store=True):
    with P.stored_in(clip.model, precision if store else "fp32"), P.autocast(precision, device):
        return features(clip, x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000, help="lab test images per model")
    p.add_argument("--batch", type=int, default=16, help="ViT-B-32 batch for images/s")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="ViT-B-32 timing with 2 repetitions, badnet + clean only")
    p.add_argument("--out", default="bench/results/precision", help="path prefix of .json/.md")
    args = p.parse_args(argv)
    t0 = time.time()
    speed = throughput("ViT-B-32", args.batch, 2 if args.quick else args.reps)
    rows = []
    names = [n for n, e in manifest.models().items() if manifest.bundled(e)]
    for name in (["badnet", "clean"] if args.quick else names):
        checkpoint = str(manifest.checkpoint(manifest.models()[name]))   # the clean model: ASR of the BadNet trigger
        job = prepare(JobConfig(checkpoint=checkpoint, attack="badnet" if name == "clean" else name, shots=1,
                                eval_limit=args.images), log=lambda *a: None)
        out = {}
        for prec in ("fp32", "bf16"):
            job.eval_precision = prec
            t = time.perf_counter()
            out[prec] = {**measure(job), "seconds": round(time.perf_counter() - t, 2)}
        rows.append({"model": name, **out, "ca_diff": out["bf16"]["ca"] - out["fp32"]["ca"],
                     "asr_diff": out["bf16"]["asr"] - out["fp32"]["asr"]})
    cmd = command("bench.precision", argv)
    ratio = speed["bf16"] / speed["fp32"]
    ratio_autocast = speed["bf16 autocast only"] / speed["fp32"]
    write_json(args.out + ".json", {"command": cmd, "machine": machine(), "cpu_bf16": P.cpu_has_bf16(),
                                    "vit_b32_images_per_s": speed, "bf16_speedup": ratio, "bf16_autocast_only_speedup": ratio_autocast, "lab": rows,
                                    "seconds": round(time.time() - t0, 1)})
    lines = [f"ViT-B-32 (random weights) image tower, batch {args.batch}, CPU, {torch.get_num_threads()} threads: "
             f"fp32 {speed['fp32']:.1f} images/s; `--precision bf16` (weights stored in bf16, autocast) "
             f"{speed['bf16']:.1f} images/s (**{ratio:.2f}x**); autocast alone over fp32 weights "
             f"{speed['bf16 autocast only']:.1f} images/s ({ratio_autocast:.2f}x).",
             "", "CA/ASR through `--precision bf16`:", "",
             "| lab model | fp32 CA / ASR | bf16 CA / ASR | CA diff | ASR diff | fp32 s | bf16 s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['fp32']['ca']:.2f} / {r['fp32']['asr']:.2f} | {r['bf16']['ca']:.2f} / "
                     f"{r['bf16']['asr']:.2f} | {r['ca_diff']:+.2f} | {r['asr_diff']:+.2f} | {r['fp32']['seconds']:.1f} | "
                     f"{r['bf16']['seconds']:.1f} |")
    lines += ["", f"CA/ASR on the first {args.images:,} Fashion-MNIST test images (lab CLIP); images/s from "
              f"bench.common's interleaved medians (`{cmd}`)."]
    md = "\n".join(lines) + "\n"
    with atomic_path(Path(args.out + ".md")) as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
