"""Every defense against every bundled backdoored lab model: ASR % (CA %) per cell, like Table 1 of the
RVPT paper, plus tuned parameters and tuning seconds per defense. Lab CLIP numbers (Fashion-MNIST), not
real CLIP.

    python -m bench.defense_matrix            # the README table: all attacks x all defenses, 16-shot
    python -m bench.defense_matrix --quick    # CI smoke: one attack, few epochs, 500 test images

Each attack's model, data and no-defense numbers are loaded once (engine.job.prepare); each defense then
runs as engine.tune would run it (engine.job.defend), with fixed seeds. Writes bench/results/defense_matrix
.json, .md and .png (a heat map of ASR)."""
import argparse
import statistics
import time
from pathlib import Path

from engine import purify
from engine.job import JobConfig, defend, prepare
from engine.evaluate import evaluate_attack
from engine.io import atomic_path, write_json

from .common import bundled_attacks, command, machine, pyplot, save_figure

ORDER = ["none", "linear-probe", "cleanclip", "coop", "vpt", "cbpt", "rvpt", "rvpt+cbpt"]
LABELS = {"none": "no defense", "linear-probe": "linear probe", "cleanclip": "CleanCLIP", "coop": "CoOp",
          "vpt": "deep VPT (alpha=0)", "cbpt": "CBPT", "rvpt": "RVPT", "rvpt+cbpt": "RVPT+CBPT"}
# --quick: a smoke run of every code path, not a measurement (epochs = steps for cbpt/coop).
QUICK_EPOCHS = {"linear-probe": 5, "cleanclip": 2, "coop": 20, "vpt": 3, "cbpt": 20, "rvpt": 3, "rvpt+cbpt": 3}


def run_attack(attack, defenses, shots, eval_limit, quick, seed, log):
    job = prepare(JobConfig(attack=attack, shots=shots, seed=seed, eval_limit=eval_limit, fused=True), log=lambda *a: None)
    cells = {"none": {**evaluate_attack(job.clip, job.test, job.trigger, job.target, text=job.text),
                      "seconds": 0.0, "tuned_params": 0}}
    log(f"{attack}: no defense ASR {cells['none']['asr']:.2f} CA {cells['none']['ca']:.2f}")
    for name in defenses:
        t0 = time.time()
        tuned = defend(job, name, purify.config(name, job.model, epochs=QUICK_EPOCHS[name] if quick else None, seed=seed))
        cells[name] = {**tuned.after, "seconds": round(tuned.seconds, 2), "wall_seconds": round(time.time() - t0, 2),
                       "tuned_params": tuned.tuned_params, "config": tuned.config}
        log(f"{attack}: {name:<13} ASR {tuned.after['asr']:6.2f} CA {tuned.after['ca']:6.2f}  "
            f"({tuned.seconds:.1f} s tuning, {time.time() - t0:.1f} s with evaluation)")
    return {"attack": attack, "test_images": len(job.test), "tuning_images": len(job.train), "cells": cells}


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
    args = p.parse_args(argv)
    attacks = args.attacks or bundled_attacks()[:1 if args.quick else None]
    defenses = [d for d in ORDER[1:] if d in (args.defenses or ORDER)]
    shots, eval_limit = (4, args.eval_limit or 500) if args.quick else (args.shots, args.eval_limit)
    t0 = time.time()
    rows = [run_attack(a, defenses, shots, eval_limit, args.quick, args.seed, print) for a in attacks]
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
