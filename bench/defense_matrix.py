"""Every defense against every bundled backdoored lab model: ASR % (CA %) per cell, like Table 1 of the
RVPT paper, plus tuned parameters and tuning seconds per defense. Lab CLIP numbers (Fashion-MNIST), not
real CLIP.

    python -m bench.defense_matrix            # the README table: all attacks x all defenses, 16-shot
    python -m bench.defense_matrix --quick    # CI smoke: one attack, few epochs, 500 test images
    python -m bench.defense_matrix --shard 0/2 & python -m bench.defense_matrix --shard 1/2; \
        python -m bench.defense_matrix --cached-only       # two processes, then the tables

Each attack's model, data and no-defense numbers are loaded once (engine.job.prepare); each defense then
runs as engine.tune would run it (engine.job.defend), with fixed seeds. Every cell is cached as JSON
(<out>_cells/<attack>/<defense>.json, with the settings it ran with), so a run that stops resumes where it
stopped. Writes bench/results/defense_matrix .json, .md and .png (a heat map of ASR)."""
import argparse
import json
import statistics
import time
from pathlib import Path

from engine import purify
from engine.job import JobConfig, defend, prepare
from engine.evaluate import evaluate_attack
from engine.io import atomic_path, write_json

from .common import bundled_attacks, command, machine, pyplot, save_figure
from .zoo import _shard

ORDER = ["none", "linear-probe", "cleanclip", "coop", "vpt", "cbpt", "rvpt", "rvpt+cbpt"]
LABELS = {"none": "no defense", "linear-probe": "linear probe", "cleanclip": "CleanCLIP", "coop": "CoOp",
          "vpt": "deep VPT (alpha=0)", "cbpt": "CBPT", "rvpt": "RVPT", "rvpt+cbpt": "RVPT+CBPT"}
# --quick: a smoke run of every code path, not a measurement (epochs = steps for cbpt/coop).
QUICK_EPOCHS = {"linear-probe": 5, "cleanclip": 2, "coop": 20, "vpt": 3, "cbpt": 20, "rvpt": 3, "rvpt+cbpt": 3}


def run_attack(attack, defenses, shots, eval_limit, quick, seed, log, cache, cached_only=False):
    """One row: each cell from the cache when it ran with these settings, else computed and cached
    (cached_only: left out)."""
    settings = {"shots": shots, "eval_limit": eval_limit, "seed": seed, "quick": quick}
    job, cells = None, {}
    for name in ["none"] + defenses:
        path = cache / attack / f"{name}.json"
        cfg = None if name == "none" else purify.config(name, "lab-vit", epochs=QUICK_EPOCHS[name] if quick else None,
                                                       seed=seed)
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("settings") == settings and (cfg is None or cached.get("config") == _json(cfg.as_dict())):
                cells[name] = cached
                continue
        if cached_only:
            continue
        if job is None:
            job = prepare(JobConfig(attack=attack, shots=shots, seed=seed, eval_limit=eval_limit, fused=True),
                          log=lambda *a: None)
        t0 = time.time()
        if cfg is None:
            cell = {**evaluate_attack(job.clip, job.test, job.trigger, job.target, text=job.text), "seconds": 0.0,
                    "tuned_params": 0, "test_images": len(job.test), "tuning_images": len(job.train)}
        else:
            tuned = defend(job, name, cfg)
            cell = {**tuned.after, "seconds": round(tuned.seconds, 2), "wall_seconds": round(time.time() - t0, 2),
                    "tuned_params": tuned.tuned_params, "config": _json(tuned.config)}
        cells[name] = {**cell, "settings": settings}
        write_json(path, cells[name])
        log(f"{attack}: {name:<13} ASR {cell['asr']:6.2f} CA {cell['ca']:6.2f}  ({time.time() - t0:.1f} s)")
    none = cells.get("none", {})
    return {"attack": attack, "test_images": none.get("test_images"), "tuning_images": none.get("tuning_images"),
            "cells": cells}


def _json(obj):
    return json.loads(json.dumps(obj))


def markdown(rows, defenses, seconds, cmd):
    names = ["none"] + defenses
    lines = ["| defense | " + " | ".join(r["attack"] for r in rows) + " | tuned params | tune s (mean) |",
             "|---" * (len(rows) + 3) + "|"]
    for name in names:
        cells = [r["cells"][name] for r in rows]
        row = [f"{c['asr']:.2f} ({c['ca']:.2f})" for c in cells]
        secs = statistics.mean(c["seconds"] for c in cells)
        lines.append(f"| {LABELS[name]} | " + " | ".join(row) + f" | {cells[0]['tuned_params']:,} | {secs:.1f} |")
    lines += ["", f"Whole matrix: {seconds:.0f} s (`{cmd}`)."]
    return "\n".join(lines) + "\n"


def heatmap(rows, defenses, path):
    """ASR per cell, CA in the annotation; skipped (with a note) when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return
    names = ["none"] + defenses
    asr = [[r["cells"][n]["asr"] for r in rows] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 0.5 * len(names) + 1.5))
    ax.imshow(asr, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(rows)), [r["attack"] for r in rows])
    ax.set_yticks(range(len(names)), [LABELS[n] for n in names])
    for i, n in enumerate(names):
        for j, r in enumerate(rows):
            c = r["cells"][n]
            ax.text(j, i, f"{c['asr']:.1f}\n({c['ca']:.1f})", ha="center", va="center", fontsize=8)
    ax.set_title("ASR % (CA %) on the lab CLIP, Fashion-MNIST test")
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", nargs="+", default=None, help="default: every bundled backdoored lab model")
    p.add_argument("--defenses", nargs="+", default=None, choices=ORDER[1:], help="default: all")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--eval-limit", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: first bundled attack, 4 shots, 500 test images, a few epochs per defense")
    p.add_argument("--out", default="bench/results/defense_matrix", help="path prefix of .json/.md/.png")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run every N-th attack from the I-th (0-based) only, no tables; --cached-only merges")
    p.add_argument("--cached-only", action="store_true", help="tables from the cached cells only (attacks with a "
                                                              "missing cell are listed, not run)")
    args = p.parse_args(argv)
    attacks = args.attacks or bundled_attacks()[:1 if args.quick else None]
    if args.shard:
        i, n = _shard(args.shard)
        attacks = attacks[i::n]
    defenses = [d for d in ORDER[1:] if d in (args.defenses or ORDER)]
    shots, eval_limit = (4, args.eval_limit or 500) if args.quick else (args.shots, args.eval_limit)
    cache = Path(args.out + "_cells")
    t0 = time.time()
    rows = [run_attack(a, defenses, shots, eval_limit, args.quick, args.seed, print, cache, args.cached_only)
            for a in attacks]
    if args.shard:
        return None
    missing = [r["attack"] for r in rows if len(r["cells"]) < len(defenses) + 1]
    rows = [r for r in rows if r["attack"] not in missing]
    if missing:
        print(f"not in the tables (cells not run yet): {', '.join(missing)}")
    seconds, cmd = round(time.time() - t0, 1), command("bench.defense_matrix", argv)
    md = markdown(rows, defenses, seconds, cmd)
    write_json(args.out + ".json", {"command": cmd, "machine": machine(), "quick": args.quick, "shots": shots,
                                    "seed": args.seed, "seconds": seconds, "results": rows})
    with atomic_path(Path(args.out + ".md")) as tmp:
        tmp.write_text(md)
    heatmap(rows, defenses, Path(args.out + ".png"))
    print(md)


if __name__ == "__main__":
    main()
