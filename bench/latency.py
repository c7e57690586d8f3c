"""Inference latency and throughput of the purified CLIP: torch eager vs ONNX Runtime, prompted vs not.

    python -m bench.latency                      # ViT-B-32 + lab model, batch 1, 8, 32
    python -m bench.latency --run runs/X         # lab prompts (and CA/ASR) from a tuning run
    python -m bench.latency --quick              # CI: batch 1 and 8, fewer repetitions

Variants: unprompted encoder (eager), naive-prompted (torch.cat, eager), prompt-aware `shared` (eager),
ONNX Runtime folded (export.folded) and ONNX Runtime unprompted; on CUDA also the Triton backend and
ORT's CUDA provider. All variants of one model and batch are timed round-robin (bench.common).
Writes JSON, a markdown table and (with matplotlib) a PNG next to --out."""
import argparse
import json
import tempfile
from pathlib import Path

import torch

from engine import data as D
from engine import prompted_vit
from engine.cli import run_cli
from engine.defenses.rvpt import default_config
from engine.errors import UserError
from engine.io import atomic_path, write_json
from engine.models import bundled_checkpoint, load_model
from engine.runs import load_prompts
from engine.job import resolve_target
from export import folded
from export.onnx import export
from export.predict import evaluate
from export.runtime import OnnxClassifier, choose_providers

from .common import command, interleaved_medians, latency_stats, machine

MODELS = ("ViT-B-32", "lab-vit")
TARGETS = {"ort_folded_vs_unprompted_b8": 1.10, "ort_folded_vs_eager_naive_throughput": 1.3,
           "ort_int8_vs_fp32_b8_speedup": 2.5}
ORT_LABELS = {"prompted": "folded", "unprompted": "unprompted", "prompted-int8": "folded INT8"}


def lab_setup(run):
    """Lab model, its prompts and where both came from: a run's, else bundled badnet + random prompts."""
    if run:
        prompts, meta = load_prompts(Path(run) / "prompts.safetensors")
        clip = load_model(meta["model"], meta.get("pretrained"), meta.get("checkpoint"))
        return clip, prompts, int(meta["start"]), meta, f"prompts from {run}"
    try:
        checkpoint, weights = bundled_checkpoint("badnet"), "bundled badnet checkpoint"
    except UserError:
        checkpoint, weights = None, "random weights (no bundled badnet checkpoint yet)"
    clip = load_model("lab-vit", checkpoint=checkpoint)
    p = default_config("lab-vit")
    prompts = prompted_vit.VisualPrompts.for_visual(clip.visual, p.start, p.tokens).prompts.detach()
    return clip, prompts, p.start, None, f"{weights}, random prompts b={p.tokens}, D={p.start}"


def vit_b32_setup():
    clip = load_model("ViT-B-32")
    p = default_config("ViT-B-32")
    prompts = prompted_vit.VisualPrompts.for_visual(clip.visual, p.start, p.tokens).prompts.detach()
    return clip, prompts, p.start, None, f"random weights, random prompts b={p.tokens}, D={p.start}"


def accuracy(meta, models, eval_limit, attack="badnet", target="bag"):
    """CA/ASR per family, measured here through each exported model in ONNX Runtime (so the INT8 export is
    compared with the fp32 one on the same images); a run's recorded numbers are kept beside them."""
    data = D.load_dataset("fashion-mnist", "test", models["prompted"].image_size, limit=eval_limit)
    t = resolve_target(target, data.classes)
    out = {fam: evaluate(m, data, attack, t) for fam, m in models.items()}
    out["source"] = f"measured here through ONNX Runtime on {len(data)} test images, {attack} -> {target}"
    if meta is not None:
        out["recorded"] = {"unprompted": meta["before"], "prompted": meta["after"]}
    return out


def variants(clip, prompts, start, ort_models, device):
    """name -> (family, callable on a normalised batch)."""
    visual = clip.visual
    vp = prompted_vit.VisualPrompts(visual.transformer.width, len(visual.transformer.resblocks), start,
                                    prompts.shape[1]).to(device)
    vp.prompts.data.copy_(prompts)
    out = {"eager unprompted": ("unprompted", visual),
           "eager naive": ("prompted", lambda x: prompted_vit.forward(visual, vp, x, "naive")["feature"]),
           "eager shared": ("prompted", lambda x: prompted_vit.forward(visual, vp, x, "shared")["feature"])}
    if device.type == "cuda":
        out["eager triton"] = ("prompted", lambda x: prompted_vit.forward(visual, vp, x, "triton")["feature"])
    for (fam, provider), m in ort_models.items():
        label = f"ORT {ORT_LABELS[fam]}" + (" CUDA" if provider == "cuda" else "")
        out[label] = (fam, lambda x, m=m: m.run(x))
    return out


def bench_model(name, setup, batches, reps, device, tmp, eval_limit, threads):
    clip, prompts, start, meta, note = setup
    clip.model.to(device)
    print(f"{name}: {note}")
    classes = meta["classes"] if meta else D.FASHION_CLASSES
    templates = meta["templates"] if meta else D.DEFAULT_TEMPLATES
    paths = {}
    for fam, p in (("prompted", prompts), ("unprompted", None)):
        src = folded.build(clip, classes, templates, None if p is None else p.to(device), start)
        src.module.cpu()
        paths[fam] = export(src, Path(tmp) / f"{name}-{fam}.onnx", verify=False)["path"]
        if p is not None:   # ONNX Runtime dynamic INT8 of the folded model (CPU provider)
            paths["prompted-int8"] = export(src, Path(tmp) / f"{name}-prompted-int8.onnx", verify=False,
                                            precision="int8")["path"]
    clip.model.to(device)
    providers = ["cpu"] + (["cuda"] if choose_providers()[0][0] == "CUDAExecutionProvider" else [])
    ort_models = {(fam, pr): OnnxClassifier(path, pr, threads, spinning=False)
                  for fam, path in paths.items() for pr in providers if pr == "cpu" or fam != "prompted-int8"}
    fns = variants(clip, prompts.to(device), start, ort_models, device)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(batch))
        xd, xc = x.to(device), x.numpy()
        calls = {k: (lambda f=f: f(xc)) if k.startswith("ORT") else (lambda f=f: f(xd)) for k, (_, f) in fns.items()}
        with torch.inference_mode():
            _, raw = interleaved_medians(calls, reps, warmup=1, device=device)
        for k, times in raw.items():
            rows.append({"model": name, "variant": k, "family": fns[k][0], "batch": batch,
                         **latency_stats(times, batch)})
        print(f"  batch {batch}: " + ", ".join(f"{r['variant']} {r['p50_ms']:.1f} ms" for r in rows if r["batch"] == batch))
    acc = None
    if name == "lab-vit":
        acc = accuracy(meta, {fam: ort_models[(fam, "cpu")] for fam in paths}, eval_limit)
        for r in rows:
            r["ca"], r["asr"] = acc[r["family"]]["ca"], acc[r["family"]]["asr"]
    return {"model": name, "setup": note, "image_size": clip.image_size, "prompt_start": start,
            "prompt_tokens": int(prompts.shape[1]), "accuracy": acc, "rows": rows}


def ratios(results):
    """The numbers the targets are stated in (ViT-B-32; the lab model's are listed alongside)."""
    out = {}
    for res in results:
        by = {(r["variant"], r["batch"]): r for r in res["rows"]}
        m = res["model"]
        if ("ORT folded", 8) in by:
            out[f"{m}: ORT folded / ORT unprompted p50 latency, batch 8"] = \
                by[("ORT folded", 8)]["p50_ms"] / by[("ORT unprompted", 8)]["p50_ms"]
        if ("ORT folded INT8", 8) in by:
            out[f"{m}: ORT folded INT8 speed-up over ORT folded fp32 (p50 latency), batch 8"] = \
                by[("ORT folded", 8)]["p50_ms"] / by[("ORT folded INT8", 8)]["p50_ms"]
        for b in sorted({b for _, b in by}):
            out[f"{m}: ORT folded / eager naive throughput, batch {b}"] = \
                by[("ORT folded", b)]["images_per_s"] / by[("eager naive", b)]["images_per_s"]
    return out


def markdown(results, ratio, info):
    lines = []
    for res in results:
        lab = res["accuracy"] is not None
        lines += [f"### {res['model']} ({res['image_size']} px; {res['setup']})", "",
                  "| variant | batch | p50 ms | p95 ms | images/s |" + (" CA % | ASR % |" if lab else ""),
                  "|---|---|---|---|---|" + ("---|---|" if lab else "")]
        for r in res["rows"]:
            acc = f" {r['ca']:.2f} | {r['asr']:.2f} |" if lab else ""
            lines.append(f"| {r['variant']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                         f"{r['images_per_s']:.1f} |{acc}")
        if lab:
            lines.append(f"\nCA/ASR: {res['accuracy']['source']}.")
        lines.append("")
    lines += ["| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in ratio.items()]
    lines.append(f"\nTargets (ViT-B-32): ORT folded / ORT unprompted latency at batch 8 <= "
                 f"{TARGETS['ort_folded_vs_unprompted_b8']}x; ORT folded throughput >= "
                 f"{TARGETS['ort_folded_vs_eager_naive_throughput']}x eager naive-prompted; ORT INT8 >= "
                 f"{TARGETS['ort_int8_vs_fp32_b8_speedup']}x ORT fp32 at batch 8 (1 thread: --threads 1).")
    lines.append(f"\nMachine: {json.dumps(info)}")
    return "\n".join(lines) + "\n"


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no PNG (pip install matplotlib, or the 'plot' extra)")
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        names = list(dict.fromkeys(r["variant"] for r in res["rows"]))
        batches = sorted({r["batch"] for r in res["rows"]})
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [next(r["images_per_s"] for r in res["rows"] if r["variant"] == n and r["batch"] == b) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], vals, width, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_ylabel("images/s")
        ax.set_title(res["model"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="lab-model tuning run (prompts + recorded CA/ASR)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8 32 (--quick: 1 8)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 10, --quick 3)")
    p.add_argument("--quick", action="store_true", help="CI: batch 1 and 8, 3 repetitions")
    p.add_argument("--eval-limit", type=int, default=None, help="test images for measured CA/ASR (--quick: 1000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and ORT alike (default: torch's default, ORT's default); "
                        "1 is steadier on a machine shared with other jobs")
    p.add_argument("--out", default=None, help="output prefix (default bench/results/latency[_quick])")
    args = p.parse_args(argv)
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 32])
    reps = args.reps or (3 if args.quick else 10)
    eval_limit = args.eval_limit or (1000 if args.quick else None)
    out = Path(args.out or ("bench/results/latency_quick" if args.quick else "bench/results/latency"))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            setup = lab_setup(args.run) if name == "lab-vit" else vit_b32_setup()
            results.append(bench_model(name, setup, batches, reps, device, tmp, eval_limit, args.threads))
    ratio = ratios(results)
    info = machine()
    write_json(out.with_suffix(".json"), {"command": command("bench.latency", argv), "machine": info,
                                          "device": str(device), "reps": reps, "threads": args.threads or "default",
                                          "targets": TARGETS, "ratios": ratio, "results": results})
    md = markdown(results, ratio, info)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(md)
    plot(results, out.with_suffix(".png"))
    print("\n".join(f"{k}: {v:.3f}" for k, v in ratio.items()))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    run_cli(main)
