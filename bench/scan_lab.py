"""engine.scan on every bundled lab model: does it say clean / backdoored, and name the right target?

    python -m bench.scan_lab                     # every bundled model in checkpoints/lab/manifest.json
    python -m bench.scan_lab --models clean sig --restarts 2

Writes bench/results/scan_lab.json and .md: per model the truth (manifest), the verdict, the suspected
target, the evidence numbers and seconds, then the false positive / false negative counts."""
import argparse
import tempfile
from pathlib import Path

from engine import manifest, scan
from engine.io import atomic_path, write_json
from engine.models import LAB_CHECKPOINTS

from .common import bundled_attacks, command, machine


def bundled_models():
    clean = ["clean"] if (LAB_CHECKPOINTS / "clean.safetensors").is_file() else []
    return clean + bundled_attacks()


def truth(name):
    """('clean' | 'backdoored', target class or None, no-defense ASR % or None) from the manifest."""
    entry = manifest.entry(name) or {}
    if name == "clean":
        return "clean", None, None
    return "backdoored", entry.get("target"), entry.get("asr")


def score(rows):
    """False positives (clean model flagged), false negatives (backdoored model passed), wrong targets."""
    fp = sum(r["truth"] == "clean" and r["verdict"] == "backdoored" for r in rows)
    fn = sum(r["truth"] == "backdoored" and r["verdict"] == "clean" for r in rows)
    wrong = sum(r["truth"] == "backdoored" and r["suspected_target"] != r["true_target"] for r in rows)
    return {"false_positives": fp, "false_negatives": fn, "wrong_target": wrong,
            "clean_models": sum(r["truth"] == "clean" for r in rows),
            "backdoored_models": sum(r["truth"] == "backdoored" for r in rows)}


def markdown(rows, counts):
    lines = ["| model | truth (target, ASR %) | verdict (flagged by) | suspected target | mask: target, share | "
             "mask mean | share / mask (x clean lab) | anomaly index | restarts agreeing | "
             "stripes: target, share | stripe anomaly | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, st = r["evidence"], r["stripes"]
        t = r["truth"] if r["truth"] == "clean" else f"{r['truth']} ({r['true_target']}, {r['asr']:.1f})"
        v = r["verdict"] + (f" ({r['flagged_by']})" if r["flagged_by"] else "")
        stripe = (f"{st['target']}, {st['target_share']:.2f} | {st['anomaly_index']:.1f}" if st else "- | -")
        lines.append(f"| {r['model']} | {t} | {v} | {r['suspected_target']} | {e['target']}, {e['target_share']:.2f} | "
                     f"{e['mask_mean']:.4f} | {e['efficiency']:.1f} ({e['efficiency_vs_clean_lab']:.1f}x) | "
                     f"{e['anomaly_index']:.1f} | {e['agreement']:.2f} | {stripe} | {r['seconds']:.0f} |")
    lines.append("")
    lines.append(f"False positives: {counts['false_positives']} of {counts['clean_models']} clean; "
                 f"false negatives: {counts['false_negatives']} of {counts['backdoored_models']} backdoored; "
                 f"wrong suspected target: {counts['wrong_target']}. Thresholds: mask: target share >= "
                 f"{scan.MIN_TARGET_SHARE}, share / mask >= {scan.MIN_EFFICIENCY:.1f}, anomaly index >= "
                 f"{scan.MIN_ANOMALY}; stripes: share >= {scan.MIN_STRIPE_SHARE}, anomaly index >= "
                 f"{scan.MIN_STRIPE_ANOMALY}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="default: every bundled lab model")
    p.add_argument("--out", default="bench/results/scan_lab")
    args, extra = p.parse_known_args(argv)  # anything else goes to engine.scan (--shots, --restarts, ...)
    rows = []
    for name in args.models or bundled_models():
        with tempfile.TemporaryDirectory() as tmp:
            rep = scan.main(["--lab", name, "--quiet", "--out", f"{tmp}/scan", *extra])
        kind, target, asr = truth(name)
        rows.append({"model": name, "truth": kind, "true_target": target, "asr": asr, "verdict": rep["verdict"],
                     "suspected_target": rep["suspected_target"], "flagged_by": rep["flagged_by"],
                     "evidence": rep["evidence"], "stripes": rep["stripes"],
                     "checks": rep["checks"], "restarts": rep["restarts"], "seconds": rep["seconds"]})
        print(f"{name}: truth {kind} ({target}) -> {rep['verdict']}, suspected {rep['suspected_target']}\n")
    counts = score(rows)
    md = markdown(rows, counts)
    write_json(args.out + ".json", {"command": command("bench.scan_lab", argv), "machine": machine(),
                                    "extra_scan_args": extra, **counts,
                                    "thresholds": scan.THRESHOLDS,
                                    "results": rows})
    with atomic_path(Path(args.out + ".md")) as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
