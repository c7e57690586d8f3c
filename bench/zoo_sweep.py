"""A sweep of one defense's settings on a zoo split (the dev split: where settings are chosen), side by side.

    python -m bench.zoo_sweep --split dev --defense repair \
        --configs 'default:' 'blend:extra=["blend"]' 'steps3:adv_steps=3'

Each config NAME:FIELD=VALUE[,FIELD=VALUE...] (the fields of bench.zoo --set) runs bench.zoo in its own
results folder under --work, whose cache starts from the split's cached scans (bench/results/zoo/<split>/),
so the detection is shared and only the defense is tuned again (where its cached cell's settings differ);
a rerun reuses every finished cell.
Writes bench/results/sweeps/<defense>_<split>.json and .md (or --name): the aggregate row of each config."""
import argparse
import json
import shutil
from pathlib import Path

from engine.io import atomic_path, write_json

from . import zoo as bench_zoo
from .common import command, machine

SCAN_FILES = ("none.json", "scan.json", "scan.safetensors")


def parse_config(text):
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--configs takes NAME:FIELD=VALUE,... (or NAME: for the defaults), not {text!r}")
    settings, depth, cur = [], 0, ""
    for ch in rest:   # split on the commas outside brackets (a value may be a JSON list)
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            settings.append(cur)
            cur = ""
        else:
            cur += ch
    return name, [s for s in settings + [cur] if s]


def seed_cache(source, dest, defense):
    """Copy each model's cached no-defense, scan and defense cells into a sweep folder (never over finished
    cells); a defense cell tuned with other settings than the config's is tuned again (bench.zoo's check)."""
    for model in sorted(p for p in source.iterdir() if p.is_dir()):
        target = dest / model.name
        target.mkdir(parents=True, exist_ok=True)
        for f in (*SCAN_FILES, f"{defense}.json"):
            if (model / f).is_file() and not (target / f).is_file():
                shutil.copy2(model / f, target / f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="dev")
    p.add_argument("--defense", default="repair")
    p.add_argument("--configs", nargs="+", required=True, metavar="NAME:FIELD=VALUE,...")
    p.add_argument("--work", default="bench/results/sweeps/cache", help="the per-config bench.zoo folders")
    p.add_argument("--results", default=str(bench_zoo.RESULTS))
    p.add_argument("--models", nargs="+", default=None, help="only these model names (bench.zoo --models)")
    p.add_argument("--name", default=None, help="results file name under sweeps/ (default DEFENSE_SPLIT)")
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.configs]
    source = Path(args.results) / "zoo" / args.split
    if not source.is_dir():
        raise SystemExit(f"no cached scans in {source}: run python -m bench.zoo --split {args.split} first")
    rows = []
    for name, settings in configs:
        folder = Path(args.work) / args.split / name
        seed_cache(source, folder / "zoo" / args.split, args.defense)
        bench_zoo.main(["--split", args.split, "--defenses", args.defense, "--results", str(folder)]
                       + (["--set", *settings] if settings else [])
                       + (["--models", *args.models] if args.models else []))
        agg = json.loads((folder / f"zoo_{args.split}.json").read_text())["aggregate"]
        rows.append({"config": name, "settings": settings, **agg["defenses"][args.defense]})
    out = Path(args.results) / "sweeps" / (args.name or f"{args.defense}_{args.split}")
    cmd = command("bench.zoo_sweep", argv)
    write_json(str(out) + ".json", {"command": cmd, "machine": machine(), "split": args.split, "rows": rows})
    f = bench_zoo._f
    lines = [f"Sweep of `{args.defense}` on the zoo's {args.split} split (lab CLIP, 16 shots, 2,000 test images per "
             f"model; backdoored models only in the ASR and CA-drop columns).", "",
             "| config | settings | ASR <= 5% | median ASR | worst ASR | median CA drop | worst CA drop | "
             "controls: worst CA drop | weak: median ASR | median s |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['config']} | {' '.join(r['settings']) or 'defaults'} | "
                     f"{f(r['asr_ok_share'] and 100 * r['asr_ok_share'], '{:.0f}%')} | {f(r['median_asr'])} | "
                     f"{f(r['worst_asr'])} | {f(r['median_ca_drop'])} | {f(r['worst_ca_drop'])} | "
                     f"{f(r['control_worst_ca_drop'])} | {f(r.get('weak_median_asr'))} | {f(r['median_seconds'], '{:.0f}')} |")
    lines += ["", f"`{cmd}`"]
    with atomic_path(Path(str(out) + ".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
