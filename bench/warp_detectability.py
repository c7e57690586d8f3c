"""Why the scan misses warp backdoors: how far a zoo warp trigger stands out from the warps the lab CLIP
is naturally vulnerable to. For each model (the bundled clean one and the built warp and clean models of
a zoo split), the detector's warp inversion (engine.inversion.targeted.WarpFamily: one smooth bounded
warp per class, fitted on the 16-shot shots) at several shift budgets; each class's flip share
(engine.inversion.detect.flip_shares) on the shots it was fitted on (what the scan measures) and on
held-out train images; and the true trigger's own share on the held-out images. Two more tests a warp
backdoor could fail: Neural Cleanse's size test on warps (per class the smallest mean shift that sends the
shots to it, targeted.WarpSizeFamily; a target should need a much smaller one) and random smooth warps of
the zoo's strength (WaNet without its noise mode teaches a model that any warp means the target; these
report the mean share each class gets on the held-out images). And whether the inversion's search space holds
the true trigger at all: the true field's mean and largest shift, and its share once each shift is clipped
to each budget (the inversion's tanh bound). Lab CLIP numbers.

    python -m engine.lab zoo --split dev --only dev-03-warp dev-08-warp dev-13-warp   # build them first
    python -m bench.warp_detectability --split dev

Writes bench/results/warp_detectability.json and .md."""
import argparse
import time
from dataclasses import replace
from pathlib import Path

from engine import data as D
from engine.evaluate import predict
from engine.inversion import targeted
from engine.inversion.detect import flip_shares
from engine.job import prepare
from engine.triggers.spec import warp_grid

from .common import command, machine, write_results
from .zoo import bundled_models, job_config, zoo_models

RESULTS = Path("bench/results")
SIZE_BOUND, SIZE_LAM, SIZE_STEPS = 8.0, 0.1, 200   # the size test: largest shift px, starting lambda, steps
RANDOM_PX, RANDOM_FIELDS = 3.5, 24                  # random warps: mean shift px (the zoo draws 2.5-4), count


def held_out(train_all, shots, per_class, seed):
    """`per_class` train images of each class that are not among its `shots` shots (seed `seed`)."""
    taken = set(D.few_shot_indices(train_all.labels, shots, seed, train_all.classes))
    drawn = D.few_shot_indices(train_all.labels, per_class + shots, seed + 1, train_all.classes)
    by_class = {}
    for i in drawn:
        if i not in taken:
            by_class.setdefault(int(train_all.labels[i]), []).append(i)
    return train_all.subset(sorted(i for v in by_class.values() for i in v[:per_class]))


def shares(clip, probe, clean, text, transform_of):
    """Per class k: the flip share towards k of transform_of(k) on `probe` (`clean`: its frozen predictions)."""
    return [flip_shares(probe.labels, clean, predict(clip, probe.images, text, transform=transform_of(k)),
                        len(text))[k] for k in range(len(text))]


def field_shifts(spec, size):
    """The zoo warp `spec`'s identity grid and its shift field (S, S, 2), grid units ([-1, 1] spans the image)."""
    identity = warp_grid(spec["grid"], 0.0, size, spec["seed"])[0]
    return identity, warp_grid(spec["grid"], spec["pixels"], size, spec["seed"])[0] - identity


def clipped_grid(spec, size, px):
    """The zoo warp `spec` at image size `size` with every shift clipped to +-px pixels (None: unclipped)."""
    identity, shift = field_shifts(spec, size)
    bound = float("inf") if px is None else 2 * px / size
    return identity + shift.clamp(-bound, bound)


def true_field(clip, held, clean, text, spec, k, budgets):
    """The true warp's mean and largest shift (px) and its flip share towards k with every shift clipped to
    each budget: the most a warp inversion bounded there could find of it."""
    _, shift = field_shifts(spec, clip.image_size)
    to_px = clip.image_size / 2
    out = {"mean_px": round(shift.abs().mean().item() * to_px, 2), "max_px": round(shift.abs().max().item() * to_px, 2),
           "clipped_share": {}}
    for px in budgets:
        grid = clipped_grid(spec, clip.image_size, px)
        out["clipped_share"][str(px)] = flip_shares(held.labels, clean, predict(
            clip, held.images, text, transform=lambda x: targeted.warp(x, grid)), len(text))[k]
    return out


def measure(model, budgets, shots, held_per_class, seed):
    job = prepare(job_config(model, shots, 100, seed), log=lambda *a: None)
    clip, few, text = job.clip, job.train, job.text
    train_all = D.load_dataset("fashion-mnist", "train", clip.image_size)
    held = held_out(train_all, shots, held_per_class, seed)
    truth = model["target"] if model.get("record", {}).get("trigger") else None
    row = {"name": model["name"], "kind": "warp" if truth else "clean", "target": truth, "budgets": {}}
    probes = {"shots": few, "held_out": held}
    clean = {name: predict(clip, probe.images, text) for name, probe in probes.items()}   # once per probe
    if truth:
        row["true_trigger_share"] = flip_shares(held.labels, clean["held_out"], predict(
            clip, held.images, text, transform=job.trigger), len(text))[few.classes.index(truth)]
        row["true_field"] = true_field(clip, held, clean["held_out"], text, model["record"]["trigger"],
                                       few.classes.index(truth), budgets)
    for px in budgets:
        t0 = time.time()
        cfg = replace(targeted.TargetedConfig(), warp_pixels=px, seed=seed)
        (grids, _), _, _ = targeted.invert(clip, few.images, few.labels, text, cfg, family="warp")
        towards = lambda k: lambda x: targeted.warp(x, grids[k])   # noqa: E731
        row["budgets"][str(px)] = {name: dict(zip(few.classes, shares(clip, probe, clean[name], text, towards)))
                                   for name, probe in probes.items()}
        row["budgets"][str(px)]["seconds"] = round(time.time() - t0, 1)
    t0 = time.time()
    cfg = replace(targeted.TargetedConfig(), warp_pixels=SIZE_BOUND, seed=seed)
    _, sizes, _ = targeted.invert(clip, few.images, few.labels, text, cfg, family="warp_size", lam=SIZE_LAM,
                                  steps=SIZE_STEPS)
    k, anomaly = targeted.log_outlier(sizes)
    row["smallest_warp"] = {"sizes": dict(zip(few.classes, sizes)), "smallest": few.classes[k], "anomaly": anomaly,
                            "log_gap": targeted.log_gap(sizes, k), "seconds": round(time.time() - t0, 1)}
    fields = [warp_grid(3 + r % 3, RANDOM_PX, clip.image_size, 1000 + r)[0] for r in range(RANDOM_FIELDS)]
    per_field = [shares(clip, held, clean["held_out"], text, lambda k, f=f: lambda x: targeted.warp(x, f))
                 for f in fields]
    row["random_warps"] = dict(zip(few.classes, (sum(c) / len(c) for c in zip(*per_field))))
    return row


def markdown(rows, budgets, cmd):
    lines = ["| model | true trigger share (held-out) | max shift px | probe | top class (share) | "
             "true target's share | best other class's share |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for px in budgets:
            for probe in ("shots", "held_out"):
                s, truth = r["budgets"][str(px)][probe], r["target"]
                top = max(s, key=s.get)
                cells = (f"{r['true_trigger_share']:.2f}", f"{s[truth]:.2f}",
                         f"{max(v for c, v in s.items() if c != truth):.2f}") if truth else ("-", "-", "-")
                lines.append(f"| {r['name']} ({truth or 'clean'}) | {cells[0]} | {px:g} | {probe.replace('_', '-')} | "
                             f"{top} ({s[top]:.2f}) | {cells[1]} | {cells[2]} |")
    return ("\n".join(lines) + "\n\n" + field_table(rows, budgets) + "\nShare: of the probe images neither labelled k nor predicted k, the share the "
            "class-k warp sends to k (the scan's statistic). The detector's budget is "
            f"{targeted.TargetedConfig.warp_pixels:g} px; the zoo's warps shift by 2.5-4 px on average. "
            f"Lab CLIP (Fashion-MNIST) numbers (`{cmd}`).\n\n" + other_tests(rows))


def field_table(rows, budgets):
    """The true warp against the inversion's bound, one line per warp model."""
    lines = ["| model | true field mean px | largest px | " + " | ".join(f"share clipped at {px:g} px" for px in budgets)
             + " | unclipped share |", "|---|---|---|" + "---|" * (len(budgets) + 1)]
    for r in rows:
        if "true_field" in r:
            f = r["true_field"]
            lines.append(f"| {r['name']} ({r['target']}) | {f['mean_px']:.2f} | {f['max_px']:.2f} | " + " | ".join(
                f"{f['clipped_share'][str(px)]:.2f}" for px in budgets) + f" | {r['true_trigger_share']:.2f} |")
    return "\n".join(lines) + "\n"


def other_tests(rows):
    """The size test and the random warps, one line per model."""
    lines = ["| model | smallest warp: class (mean px) | true target's (mean px) | anomaly | log gap | "
             "random warps: top class (share) | true target's share |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sw, rnd, truth = r["smallest_warp"], r["random_warps"], r["target"]
        top = max(rnd, key=rnd.get)
        truth_size, truth_share = (f"{sw['sizes'][truth]:.2f}", f"{rnd[truth]:.2f}") if truth else ("-", "-")
        lines.append(f"| {r['name']} ({truth or 'clean'}) | {sw['smallest']} ({sw['sizes'][sw['smallest']]:.2f}) | "
                     f"{truth_size} | {sw['anomaly']:.2f} | {sw['log_gap']:.2f} | {top} ({rnd[top]:.2f}) | {truth_share} |")
    return ("\n".join(lines) + f"\n\nSmallest warp: Neural Cleanse's schedule on the warp family (at most {SIZE_BOUND:g} px, "
            f"lambda from {SIZE_LAM:g}, {SIZE_STEPS} steps); anomaly and log gap as the mask test computes them. Random "
            f"warps: {RANDOM_FIELDS} seeded smooth fields of mean shift {RANDOM_PX:g} px (grids 3-5, the zoo's form), "
            "each class's mean share on the held-out images.\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="dev", help="the zoo split whose built warp and clean models are measured")
    p.add_argument("--budgets", nargs="+", type=float, default=[targeted.TargetedConfig.warp_pixels, 6.0],
                   help="largest warp shifts (px) to invert with")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--held-out", type=int, default=50, help="held-out train images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=None, help="only these models (default: the bundled clean one and "
                   "every built warp and clean model of the split)")
    p.add_argument("--out", default=str(RESULTS / "warp_detectability"))
    args = p.parse_args(argv)
    models = [m for m in bundled_models() if m["name"] == "bundled-clean"] + \
        [m for m in zoo_models(args.split) if m["family"] in ("warp", "clean") and m["checkpoint"]]
    if args.models:
        unknown = set(args.models) - {m["name"] for m in models}
        if unknown:
            raise SystemExit(f"not a built warp or clean model of {args.split}: {sorted(unknown)}")
        models = [m for m in models if m["name"] in args.models]
    rows = []
    for m in models:
        rows.append(measure(m, args.budgets, args.shots, args.held_out, args.seed))
        print(m["name"], "done", flush=True)
    cmd = command("bench.warp_detectability", argv)
    write_results(args.out, {"command": cmd, "machine": machine(), "budgets": args.budgets, "models": rows},
                  markdown(rows, args.budgets, cmd))


if __name__ == "__main__":
    main()
