"""Seconds of the backdoor scan (engine.scan's default detector on the 16-shot shots) per bundled lab
model, run alone on this machine, split by inversion family. The zoo tables' scan seconds were measured
beside other jobs on the same cores; this is the clean number for the issue's <= 2 min target.

    python -m bench.scan_time                  # every bundled lab model
    python -m bench.scan_time --models badnet clean

Writes bench/results/scan_time.json and .md."""
import argparse
import statistics
import time
from pathlib import Path

import torch

from engine import data as D
from engine import manifest
from engine.inversion.detect import DetectConfig
from engine.io import atomic_path, write_json
from engine.models import load_model
from engine.scan import scan, split_shots

from .common import command, machine

RESULTS = Path("bench/results")
FAMILIES = ("mask", "stripes", "warp")


def time_scan(name, shots, seed):
    clip = load_model("lab-vit", checkpoint=manifest.checkpoint(manifest.models()[name]))
    few, held = split_shots(D.load_fashion_mnist("train"), shots, 0, seed)
    text = clip.text_features(few.classes, D.DEFAULT_TEMPLATES)
    t0 = time.perf_counter()
    result = scan(clip, few, held, text, DetectConfig(), log=lambda *a: None)
    total = time.perf_counter() - t0
    return {"model": name, "seconds": round(total, 1), "verdict": result["verdict"],
            "target": result["suspected_target"],
            **{f"{f}_seconds": result[f]["seconds"] for f in FAMILIES if result.get(f)}}


def markdown(rows, cmd, threads):
    lines = ["| lab model | verdict (target) | mask s (incl. recheck) | stripes s | warp s | total s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['verdict']} ({r['target']}) | {r['mask_seconds']:.0f} | "
                     f"{r['stripes_seconds']:.0f} | {r['warp_seconds']:.0f} | {r['seconds']:.0f} |")
    total = [r["seconds"] for r in rows]
    return ("\n".join(lines) + f"\n\nMedian {statistics.median(total):.0f} s, max {max(total):.0f} s per model "
            f"({threads} threads, run alone; target <= 120 s). `{cmd}`\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="bundled lab model names (default: all bundled)")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "scan_time"))
    args = p.parse_args(argv)
    bundled = [n for n, e in manifest.models().items() if manifest.bundled(e)]
    names = args.models or bundled
    if set(names) - set(bundled):
        raise SystemExit(f"--models: not a bundled lab model: {sorted(set(names) - set(bundled))}; bundled: {bundled}")
    rows = []
    for name in names:
        rows.append(time_scan(name, args.shots, args.seed))
        print(rows[-1], flush=True)
    cmd = command("bench.scan_time", argv)
    write_json(args.out + ".json", {"command": cmd, "machine": machine(), "models": rows})
    md = markdown(rows, cmd, torch.get_num_threads())
    with atomic_path(Path(args.out + ".md")) as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
