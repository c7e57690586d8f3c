"""Evaluation in bf16 (`--precision bf16`: torch.autocast over the fp32 weights, engine.job.measure, on
AMX / AVX512-BF16 CPUs) against fp32, side by side in one run:
images/s on ViT-B-32 (random weights: speed only), CA/ASR of every bundled lab model (lab CLIP on
Fashion-MNIST) in both precisions, and CA/ASR after tuning RVPT and the repair on the bundled BadNet model
in each precision.

    python -m bench.precision                     # 10,000 test images per lab model
    python -m bench.precision --images 1000 --quick

Writes bench/results/precision.json and .md."""
import argparse
import time
from pathlib import Path

import torch

from engine import manifest
from engine import precision as P
from engine import purify
from engine.evaluate import features
from engine.io import atomic_path, write_json
from engine.job import JobConfig, defend, measure, prepare
from engine.models import load_model

from .common import command, interleaved_medians, machine


# the ways of running the frozen tower in bf16, each timed beside fp32: `bf16` is what evaluation runs
# (engine.job.measure: autocast over the fp32 weights, each call casting them); `bf16 tuning path`
# stores the weight matrices in bf16 under autocast (engine.precision.run)
MODES = {"fp32": lambda clip, dev: P.autocast("fp32", dev),
         "bf16": lambda clip, dev: P.autocast("bf16", dev),
         "bf16 tuning path": lambda clip, dev: P.run("bf16", dev, clip.model)}


def throughput(model_name, batch, reps, compiled=True):
    """images/s of the image tower in each of MODES, and (compiled) a bf16 copy of the tower compiled by
    torch.compile (inductor, frozen weights): the next lever, not a --precision mode."""
    clip = load_model(model_name)
    x = torch.rand(batch, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    calls = {name: (lambda mode=mode: _features(clip, x, mode(clip, device))) for name, mode in MODES.items()}
    if compiled:
        calls["bf16, torch.compile (inductor, freezing)"] = _compiled_bf16(clip, x)
    medians, _ = interleaved_medians(calls, reps, warmup=2, device=device)
    return {name: batch / medians[name] for name in calls}


def _compiled_bf16(clip, x):
    import copy

    import torch._inductor.config as inductor
    from engine.prompted_vit import frozen_forward
    inductor.freezing = True          # weights folded in as constants: the packed bf16 matmuls
    visual = copy.deepcopy(clip.model.visual).to(torch.bfloat16).eval()
    forward = torch.compile(lambda images: frozen_forward(visual, images))
    normalised = clip.normalise(x).bfloat16()

    def call():
        with torch.no_grad():
            return forward(normalised).float()
    call()   # compile before timing
    return call


def _features(clip, x, context):
    with context:
        return features(clip, x)


def tuned_rows(defenses, shots, images):
    """Each defense tuned on the bundled BadNet model three times: all in fp32, all in bf16, and in fp32 again
    from the next seed (how far a run moves when only its random draws do: the floor a bf16 difference is read
    against). CA/ASR after each."""
    if not defenses:
        return []
    checkpoint = str(manifest.checkpoint(manifest.models()["badnet"]))
    job = prepare(JobConfig(checkpoint=checkpoint, attack="badnet", shots=shots, eval_limit=images), log=lambda *a: None)
    rows = []
    for name in defenses:
        out = {}
        for run, prec, seed in (("fp32", "fp32", 0), ("bf16", "bf16", 0), ("fp32_seed1", "fp32", 1)):
            job.tune_precision = job.eval_precision = prec
            job.detection = None          # the repair detects again, in this precision
            tuned = defend(job, name, purify.config(name, job.model, seed=seed))
            out[run] = {**tuned.after, "tune_seconds": round(tuned.seconds, 1)}
        rows.append({"defense": name, **out, "ca_diff": out["bf16"]["ca"] - out["fp32"]["ca"],
                     "asr_diff": out["bf16"]["asr"] - out["fp32"]["asr"],
                     "seed_ca_diff": out["fp32_seed1"]["ca"] - out["fp32"]["ca"],
                     "seed_asr_diff": out["fp32_seed1"]["asr"] - out["fp32"]["asr"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000, help="lab test images per model")
    p.add_argument("--batch", type=int, default=16, help="ViT-B-32 batch for images/s")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="ViT-B-32 timing with 2 repetitions, badnet + clean only")
    p.add_argument("--tune", nargs="*", default=["rvpt", "repair"], metavar="DEFENSE",
                   help="defenses tuned on the bundled BadNet model in fp32 and again in bf16 (tuning and "
                        "evaluation), CA/ASR after each (none: skip)")
    p.add_argument("--shots", type=int, default=16, help="shots per class of the --tune runs")
    p.add_argument("--out", default="bench/results/precision", help="path prefix of .json/.md")
    args = p.parse_args(argv)
    t0 = time.time()
    speed = throughput("ViT-B-32", args.batch, 2 if args.quick else args.reps, compiled=not args.quick)
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
    tuned = tuned_rows(args.tune, args.shots, args.images)
    cmd = command("bench.precision", argv)
    speedup = {name: speed[name] / speed["fp32"] for name in speed}
    ratio = speedup["bf16"]
    cpu = machine()
    write_json(args.out + ".json", {"command": cmd, "machine": cpu, "cpu_bf16": P.cpu_has_bf16(),
                                    "vit_b32_images_per_s": speed, "bf16_speedup": ratio, "speedup": speedup,
                                    "lab": rows, "tuned": tuned, "seconds": round(time.time() - t0, 1)})
    lines = [f"ViT-B-32 (random weights) image tower, batch {args.batch}, CPU {cpu['cpu']} "
             f"({', '.join(cpu['cpu_flags']) or 'no bf16 flags'}), {torch.get_num_threads()} threads, "
             f"images/s side by side:", "", "| mode | images/s | x fp32 |", "|---|---|---|"]
    lines += [f"| {'**bf16** (`--precision bf16` evaluation: autocast)' if n == 'bf16' else n} | "
              f"{speed[n]:.1f} | {speedup[n]:.2f} |" for n in speed]
    lines += ["", "CA/ASR through `--precision bf16`:", "",
             "| lab model | fp32 CA / ASR | bf16 CA / ASR | CA diff | ASR diff | fp32 s | bf16 s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['fp32']['ca']:.2f} / {r['fp32']['asr']:.2f} | {r['bf16']['ca']:.2f} / "
                     f"{r['bf16']['asr']:.2f} | {r['ca_diff']:+.2f} | {r['asr_diff']:+.2f} | {r['fp32']['seconds']:.1f} | "
                     f"{r['bf16']['seconds']:.1f} |")
    if tuned:
        lines += ["", f"CA/ASR after tuning on the bundled BadNet model ({args.shots} shots; tuned and evaluated in "
                  f"each precision; the seed-1 columns: fp32 again from the next seed, the run-to-run floor):", "",
                  "| defense | fp32 CA / ASR | bf16 CA / ASR | CA diff | ASR diff | fp32 seed 1 CA / ASR | "
                  "seed CA diff | seed ASR diff | fp32 tune s | bf16 tune s |", "|---" * 10 + "|"]
        for r in tuned:
            lines.append(f"| {r['defense']} | {r['fp32']['ca']:.2f} / {r['fp32']['asr']:.2f} | {r['bf16']['ca']:.2f} / "
                         f"{r['bf16']['asr']:.2f} | {r['ca_diff']:+.2f} | {r['asr_diff']:+.2f} | "
                         f"{r['fp32_seed1']['ca']:.2f} / {r['fp32_seed1']['asr']:.2f} | {r['seed_ca_diff']:+.2f} | "
                         f"{r['seed_asr_diff']:+.2f} | {r['fp32']['tune_seconds']:.0f} | "
                         f"{r['bf16']['tune_seconds']:.0f} |")
    lines += ["", f"CA/ASR on the first {args.images:,} Fashion-MNIST test images (lab CLIP); images/s from "
              f"bench.common's interleaved medians (`{cmd}`)."]
    md = "\n".join(lines) + "\n"
    with atomic_path(Path(args.out + ".md")) as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
