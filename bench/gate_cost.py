"""Where the repair's CA goes on a flagged model: the gate's keep cut against the cosines it is meant to
separate, measured on the test images. The cut (engine.defenses.repair.keep_threshold) is set on the shots
from stand-in triggers; here, on the test images the frozen model reads as the suspected target k, it is
compared with the cosines cos(prompted, frozen feature) of the target class's own images (whose frozen
answer the cut should keep) and of images carrying the REAL trigger (whose answer it must not keep).
The hindsight cut is balanced_cut on those test cosines, same weight: what a perfect stand-in would give.

    python -m engine.lab zoo --split blind            # build the models first
    python -m bench.gate_cost --split blind --models blind-02-periodic blind-09-optimised

Reads each model's cached scan and no-defense cells (bench.zoo's), runs the repair with its defaults once, and writes
bench/results/gate_cost.json and .md. Lab CLIP numbers."""
import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.defenses.repair import balanced_cut
from engine.evaluate import features
from engine.inversion.detect import conclude
from engine.job import defend, prepare
from engine.purify import tuned_view

from .common import command, machine, write_results
from .zoo import RESULTS, defense_config, detect_config, job_config, load_tensors, zoo_models


def cosines(clip, prompted, images, text, k):
    """cos(prompted, frozen feature) of the images the frozen model reads as k."""
    zf, zp = features(clip, images), features(clip, images, prompted)
    hit = (zf @ text.t()).argmax(1) == k
    return F.cosine_similarity(zp[hit], zf[hit], dim=-1).cpu()


def measure_model(model, cache, seed):
    cells = cache / model["name"]
    scan = json.loads((cells / "scan.json").read_text())
    if scan["verdict"] != "backdoored":   # nothing is tuned on a model read clean: no model to load
        return None
    before = json.loads((cells / "none.json").read_text())   # bench.zoo's no-defense cell, same job
    job = prepare(job_config(model, 16, 2000, seed), log=lambda *a: None)
    job.detection = conclude(scan, load_tensors(cells / "scan.safetensors"), detect_config(False), job.clip.image_size)
    cfg = defense_config("repair", False, seed)
    tuned = defend(job, "repair", cfg)
    k, cut, text = tuned.gate, tuned.gate_keep, job.text.to(job.clip.device)
    test = job.test
    _, prompted, _ = tuned_view(replace(tuned, gate=None), job.clip, job.text, test.classes, job.templates)  # ungated
    own = cosines(job.clip, prompted, test.images[test.labels == k], text, k)
    others = test.images[test.labels != k]
    real = cosines(job.clip, prompted, job.trigger(others.to(job.clip.device)), text, k)
    hindsight = balanced_cut(real, own, len(text), cfg.keep_weight)
    kept = lambda c, at: round(100 * (c >= at).float().mean().item(), 1) if len(c) else None   # noqa: E731
    return {"name": model["name"], "target": test.classes[k], "ca_before": before["ca"], "ca_after": tuned.after["ca"],
            "asr_after": tuned.after["asr"], "cut": cut, "own_read_k": len(own), "triggered_read_k": len(real),
            "own_median": own.median().item(), "real_q95": torch.quantile(real, 0.95).item() if len(real) else None,
            "own_kept": kept(own, cut), "real_kept": kept(real, cut), "hindsight_cut": hindsight,
            "own_kept_hindsight": kept(own, hindsight), "real_kept_hindsight": kept(real, hindsight)}


def markdown(rows, cmd):
    lines = ["| model | target | CA drop | cut | own images read k | kept at cut | real-trigger cos q95 | own cos median | "
             "hindsight cut | own kept (hindsight) | triggered kept (hindsight) |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['target']} | {r['ca_before'] - r['ca_after']:.2f} | {r['cut']:.3f} | "
                     f"{r['own_read_k']} | {r['own_kept']}% | {r['real_q95']:.3f} | {r['own_median']:.3f} | "
                     f"{r['hindsight_cut']:.3f} | {r['own_kept_hindsight']}% | {r['real_kept_hindsight']}% |")
    gaps = [r["cut"] - r["real_q95"] for r in rows if r["real_q95"] is not None]
    return ("\n".join(lines) + "\n\nOn the test images the frozen model reads as the suspected target k: the "
            "target class's own images and the other classes' images with the real trigger; cos(prompted, frozen "
            "feature) at or above the cut keeps the frozen answer. The cut sits "
            f"{statistics.median(gaps):.3f} (median) above the real trigger's 0.95 quantile. Lab CLIP numbers "
            f"(`{cmd}`).\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="blind")
    p.add_argument("--models", nargs="+", required=True, help="built zoo models whose cached scan flags them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS), help="folder of bench.zoo's cached cells")
    p.add_argument("--out", default=str(RESULTS / "gate_cost"))
    args = p.parse_args(argv)
    known = {m["name"]: m for m in zoo_models(args.split)}
    missing = [n for n in args.models if n not in known or known[n]["checkpoint"] is None]
    if missing:
        raise SystemExit(f"not built in split {args.split!r}: {missing} (python -m engine.lab zoo --split "
                         f"{args.split} --only ...)")
    cache = Path(args.results) / "zoo" / args.split
    rows = []
    for name in args.models:
        row = measure_model(known[name], cache, args.seed)
        print(name, "read clean by its cached scan: skipped" if row is None else "done", flush=True)
        rows += [row] if row else []
    cmd = command("bench.gate_cost", argv)
    write_results(args.out, {"command": cmd, "machine": machine(), "models": rows}, markdown(rows, cmd))


if __name__ == "__main__":
    main()
