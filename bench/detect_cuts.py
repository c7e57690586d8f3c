"""The scan's cuts from clean controls: per statistic the detector thresholds, its controls' mean, SD and
largest value, and the cut `--sds` SDs above their mean. A defender can fine-tune as many clean controls
as they like, so the cuts on the effect sizes (the mask gap, the stripe and warp flip shares) come from
the controls' spread rather than from the largest of a few; the MAD z-scores (anomaly indices) are
already standardised and keep the cuts they had. Each family flags only when both of its checks pass.
Only clean fine-tunes are calibrated on (a poisoning that did not take is a control of the targets, but
it carries a trigger). The table then counts what the current and the calibrated cuts flag on the split
(scan evidence from bench.zoo's cached cells; the inversions are not run again). Lab CLIP numbers.

    python -m bench.zoo --split dev --defenses repair     # fills the scan cells
    python -m bench.detect_cuts --split dev               # the split the cuts are chosen on

Writes bench/results/detect_cuts_<split>.json and .md (or --out)."""
import argparse
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

from engine import zoo
from engine.inversion.detect import DetectConfig, decide

from .common import command, machine, write_results
from .zoo import kind, parse_setting, split_models

RESULTS = Path("bench/results")
# (config field, the scan evidence it reads, calibrated from the controls?)
STATISTICS = [("min_mask_gap", ("mask", "log_gap"), True),
              ("min_mask_anomaly", ("mask", "anomaly_index"), False),
              ("min_stripe_share", ("stripes", "target_share"), True),
              ("min_stripe_anomaly", ("stripes", "anomaly_index"), False),
              ("min_warp_share", ("warp", "target_share"), True),
              ("min_warp_anomaly", ("warp", "anomaly_index"), False)]


def scan_cells(split, results):
    """(model name, kind, cached scan cell, true target or None) for the split's models with a scan cell."""
    out = []
    for m in split_models(split):
        path = results / "zoo" / split / m["name"] / "scan.json"
        if path.is_file():
            out.append((m["name"], kind(m), json.loads(path.read_text()), m["target"]))
    return out


def calibrate(cells, sds):
    """Per statistic: the clean controls' n, mean, SD, max, and the cut (mean + sds x SD, rounded up to 0.01,
    for the calibrated ones; the current default for the others)."""
    base = DetectConfig()
    out = {}
    for field, (family, key), calibrated in STATISTICS:
        # clean fine-tunes only: a poisoned model whose backdoor did not take (kind "failed") still carries
        # a trigger, and is a control of the targets but no sample of what clean models look like
        values = [c[family][key] for _, k, c, _ in cells if k == "clean" and c.get(family)]
        if len(values) < 2:
            raise SystemExit(f"{field}: {len(values)} controls with a scan cell; build and scan more")
        mean, sd = statistics.mean(values), statistics.stdev(values)
        cut = math.ceil(100 * (mean + sds * sd)) / 100 if calibrated else getattr(base, field)
        out[field] = {"controls": len(values), "mean": mean, "sd": sd, "max": max(values),
                      "current": getattr(base, field), "cut": cut, "calibrated": calibrated}
    return out


def flagged(cells, cfg):
    """Per kind: how many models the cuts flag, how many of those with the right target (the flagging
    family's), and which (name, family, suspected target)."""
    counts = {}
    for name, k, c, truth in cells:
        verdict, _, family = decide(c["mask"], c.get("stripes"), cfg, c.get("warp"))
        row = counts.setdefault(k, {"models": 0, "flagged": 0, "target_right": 0, "flagged_models": []})
        row["models"] += 1
        if verdict == "backdoored":
            suspected = c[family]["target"]
            row["flagged"] += 1
            row["target_right"] += suspected == truth
            row["flagged_models"].append(f"{name} ({family}, {suspected})")
    return counts


def markdown(split, cuts, before, after, sds, cmd):
    by_hand = [f for f, c in cuts.items() if c.get("set")]
    lines = [f"Scan cuts from the `{split}` split's clean controls (lab CLIP, Fashion-MNIST): mean + {sds:g} SD of "
             "the controls for the effect sizes; the anomaly indices (MAD z-scores) keep their cuts"
             + (f"; set by hand: {', '.join(by_hand)}" if by_hand else "") + ".", "",
             "| cut | controls | mean | SD | largest | current cut | calibrated cut |", "|---" * 7 + "|"]
    for field, c in cuts.items():
        lines.append(f"| {field} | {c['controls']} | {c['mean']:.3f} | {c['sd']:.3f} | {c['max']:.3f} | "
                     f"{c['current']:g} | {c['cut']:g}{' (set)' if c.get('set') else '' if c['calibrated'] else ' (kept)'} |")
    lines += ["", "| models | count | flagged, current cuts (target right) | flagged, calibrated cuts (target right) |",
              "|---" * 4 + "|"]
    for k in ("backdoored", "weak", "failed", "clean"):
        if k in before:
            lines.append(f"| {k} | {before[k]['models']} | {before[k]['flagged']} ({before[k]['target_right']}) | "
                         f"{after[k]['flagged']} ({after[k]['target_right']}) |")
    moved = sorted(set(sum((v["flagged_models"] for v in before.values()), [])) ^
                   set(sum((v["flagged_models"] for v in after.values()), [])))
    lines += ["", "Verdicts or flagging families that differ: " + (", ".join(moved) if moved else "none") + ".",
              "", f"`{cmd}`"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="dev", choices=list(zoo.SPLITS))
    p.add_argument("--sds", type=float, default=3.0, help="a calibrated cut sits this many SDs above the controls' mean")
    p.add_argument("--results", default=str(RESULTS), help="the folder of bench.zoo's cells")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="cuts set by hand instead of calibrated (e.g. min_mask_anomaly=0: what dropping a check does)")
    p.add_argument("--out", default=None, help="output path without extension (default <results>/detect_cuts_<split>)")
    args = p.parse_args(argv)
    results = Path(args.results)
    cells = scan_cells(args.split, results)
    cuts = calibrate(cells, args.sds)
    for field, value in map(parse_setting, args.set):
        if field not in cuts or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SystemExit(f"--set {field}={value}: use FIELD=NUMBER with FIELD one of {', '.join(cuts)}")
        cuts[field].update(cut=float(value), set=True)
    before = flagged(cells, DetectConfig())
    after = flagged(cells, replace(DetectConfig(), **{f: c["cut"] for f, c in cuts.items()}))
    cmd = command("bench.detect_cuts", argv)
    payload = {"command": cmd, "machine": machine(), "split": args.split, "sds": args.sds, "cuts": cuts,
               "current": before, "calibrated": after}
    write_results(args.out or results / f"detect_cuts_{args.split}", payload,
                  markdown(args.split, cuts, before, after, args.sds, cmd))
    return cuts


if __name__ == "__main__":
    main()
