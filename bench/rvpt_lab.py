"""RVPT vs plain deep VPT (alpha = 0) on every bundled backdoored lab model: CA/ASR before and after.

    python -m bench.rvpt_lab                 # all bundled attacks, 16-shot, default settings
    python -m bench.rvpt_lab --attacks badnet --seeds 0 1 2

Writes bench/results/rvpt_lab.json and .md (the README's security table comes from it)."""
import argparse
import statistics
import tempfile
from pathlib import Path

from engine import tune
from engine.io import atomic_path, write_json

from .common import bundled_attacks, command, machine


def markdown(rows):
    lines = ["| attack | no defense ASR % (CA %) | deep VPT, alpha=0 ASR % (CA %) | RVPT, alpha=2 ASR % (CA %) | RVPT tune s |",
             "|---|---|---|---|---|"]
    for r in rows:
        cell = lambda d: f"{d['asr']:.2f} ({d['ca']:.2f})"
        lines.append(f"| {r['attack']} | {cell(r['before'])} | {cell(r['vpt'])} | {cell(r['rvpt'])} | {r['rvpt_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def mean_metrics(results):
    return {k: statistics.mean(r["after"][k] for r in results) for k in ("ca", "asr", "pa")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", nargs="+", default=None, help="default: every bundled backdoored model")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--out", default="bench/results/rvpt_lab")
    args, extra = p.parse_known_args(argv)  # anything else goes to engine.tune (e.g. --lr, --epochs)
    rows = []
    for attack in args.attacks or bundled_attacks():
        row = {"attack": attack}
        for name, alpha in (("vpt", 0.0), ("rvpt", 2.0)):
            runs = []
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(tune.main(["--fused", "--attack", attack, "--alpha", str(alpha), "--seed", str(seed),
                                           "--shots", str(args.shots), "--quiet", "--out", f"{tmp}/run", *extra]))
            row["before"] = runs[0]["before"]
            row[name] = mean_metrics(runs)
            row[f"{name}_seconds"] = statistics.mean(r["tune_seconds"] for r in runs)
            row[f"{name}_runs"] = [{"seed": s, "after": r["after"]} for s, r in zip(args.seeds, runs)]
        row["config"] = runs[0]["config"]
        rows.append(row)
        print(f"{attack}: before ASR {row['before']['asr']:.2f} CA {row['before']['ca']:.2f} | "
              f"VPT ASR {row['vpt']['asr']:.2f} CA {row['vpt']['ca']:.2f} | RVPT ASR {row['rvpt']['asr']:.2f} CA {row['rvpt']['ca']:.2f}")
    md = markdown(rows)
    write_json(args.out + ".json", {"command": command("bench.rvpt_lab", argv), "machine": machine(),
                                    "shots": args.shots, "seeds": args.seeds, "extra_tune_args": extra, "results": rows})
    with atomic_path(Path(args.out + ".md")) as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
