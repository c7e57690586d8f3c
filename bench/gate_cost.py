"""Where the repair's CA goes on a flagged model: the gate's keep cut against the cosines it is meant to
separate, measured on the test images. The cut (engine.defenses.repair.keep_threshold) is set on the shots
from stand-in triggers; here, on the test images the frozen model reads as the suspected target k, it is
compared with the cosines cos(prompted, frozen feature) of the target class's own images (whose frozen
answer the cut should keep) and of images carrying the REAL trigger (whose answer it must not keep).
The hindsight cut is balanced_cut on those test cosines, same weight: what a perfect stand-in would give.
The frontier: the gated model's CA and ASR on the test images at every cut of a grid (the prompts stay the
ones tuned), and the least CA drop any cut reaches with ASR <= --asr-budget: what no choice of cut can beat.
A second table sets the cosine against another statistic a gate could cut on (the class-k logit's change):
how well each separates the two kinds of images (AUROC) and the least CA drop a cut on each reaches.
--set FIELD=VALUE tunes the repair with other settings (bench.zoo's --set), to see whether they move it.

    python -m engine.lab zoo --split blind            # build the models first
    python -m bench.gate_cost --split blind --models blind-02-periodic blind-09-optimised
    python -m bench.gate_cost --split dev --models dev-07-periodic --set w_clean_ce=1 --out /tmp/gate_ce

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
from engine.inversion import LOGIT_SCALE
from engine.inversion.detect import conclude
from engine.job import defend, prepare
from engine.purify import tuned_view

from .common import command, machine, write_results
from .zoo import (RESULTS, auroc, defense_config, detect_config, job_config, load_tensors, parse_settings,
                  split_models)

CUTS = torch.linspace(0.5, 1.0, 101)   # the frontier's grid (cosines below 0.5: the prompts answer nearly all)


def cosines(clip, prompted, images, text, k):
    """cos(prompted, frozen feature) of the images the frozen model reads as k."""
    zf, zp = features(clip, images), features(clip, images, prompted)
    hit = (zf @ text.t()).argmax(1) == k
    return F.cosine_similarity(zp[hit], zf[hit], dim=-1).cpu()


def gated_rates(frozen, prompted, cos, labels, target, k, cut):
    """CA and ASR % of the gated model at keep cut `cut`, from per-image frozen and prompted predictions and
    cosines: (clean, triggered) pairs of each. The prompts answer where the frozen model says k and cos < cut."""
    (fc, ft), (pc, pt), (cc, ct) = frozen, prompted, cos
    clean = torch.where((fc == k) & (cc < cut), pc, fc)
    trig = torch.where((ft == k) & (ct < cut), pt, ft)
    other = labels != target
    return 100 * (clean == labels).float().mean().item(), 100 * (trig[other] == target).float().mean().item()


def least_drop(points, ca_before, budget):
    """(CA drop, cut) of the frontier point with the least CA drop among those with ASR <= budget; None if none."""
    ok = [(ca_before - ca, cut) for cut, ca, asr in points if asr <= budget]
    return min(ok) if ok else None


def _predictions(clip, prompted, images, text, k, transform=None):
    """Frozen and prompted predictions, cos(prompted, frozen feature), and how far the prompts move the class-k
    logit (prompted - frozen: another statistic a gate could cut on, keeping the frozen answer above it)."""
    zf, zp = features(clip, images, transform=transform), features(clip, images, prompted, transform=transform)
    lf, lp = LOGIT_SCALE * zf @ text.t(), LOGIT_SCALE * zp @ text.t()
    return (lf.argmax(1).cpu(), lp.argmax(1).cpu(), F.cosine_similarity(zp, zf, dim=-1).cpu(),
            (lp[:, k] - lf[:, k]).cpu())


def own_and_real(frozen, stats, labels, k):
    """A statistic's (clean, triggered) values on the images the frozen model reads as k: the target class's
    own clean images, and the other classes' images with the real trigger."""
    (fc, ft), (sc, st) = frozen, stats
    return sc[(labels == k) & (fc == k)].float(), st[(labels != k) & (ft == k)].float()


def statistic_cost(frozen, prompted, stats, labels, target, k, ca_before, budget):
    """For a gate statistic (clean, triggered values): how well it tells the target class's own images from
    really-triggered ones among those the frozen model reads as k (AUROC, own above), and the least CA drop
    any cut on it reaches at ASR <= budget (cuts at 201 quantiles of those values)."""
    own, real = own_and_real(frozen, stats, labels, k)
    grid = torch.quantile(torch.cat([own, real]), torch.linspace(0, 1, 201))
    grid = torch.cat([grid[:1] - 1, grid, grid[-1:] + 1])
    points = [(c, *gated_rates(frozen, prompted, stats, labels, target, k, c)) for c in grid.tolist()]
    best = least_drop(points, ca_before, budget)
    return {"auroc": auroc(own.tolist(), real.tolist()), "frontier_ca_drop": best and best[0]}


def joint_cost(frozen, prompted, first, second, labels, target, k, ca_before, budget, steps=41):
    """A gate that reads both statistics (the frozen answer kept where each is at or above its own cut): the
    least CA drop any pair of cuts reaches at ASR <= budget, over `steps` quantiles of each (hindsight)."""
    qs = torch.linspace(0, 1, steps)
    grids = []
    for stats in (first, second):
        values = torch.cat(own_and_real(frozen, stats, labels, k))
        grids.append(torch.cat([torch.quantile(values, qs), values.max()[None] + 1]))
    best = None
    for a in grids[0].tolist():
        for b in grids[1].tolist():
            # min of the two margins: below 0 where either statistic says the prompts moved the image enough
            both = tuple(torch.minimum(x - a, y - b) for x, y in zip(first, second))
            ca, asr = gated_rates(frozen, prompted, both, labels, target, k, 0.0)
            if asr <= budget and (best is None or ca_before - ca < best):
                best = ca_before - ca
    return {"frontier_ca_drop": best}


def measure_model(model, cache, seed, settings=None, budget=2.0):
    cells = cache / model["name"]
    scan = json.loads((cells / "scan.json").read_text())
    if scan["verdict"] != "backdoored":   # nothing is tuned on a model read clean: no model to load
        return None
    before = json.loads((cells / "none.json").read_text())   # bench.zoo's no-defense cell, same job
    job = prepare(job_config(model, 16, 2000, seed), log=lambda *a: None)
    job.detection = conclude(scan, load_tensors(cells / "scan.safetensors"), detect_config(False), job.clip.image_size)
    cfg = defense_config("repair", False, seed, settings)
    tuned = defend(job, "repair", cfg)
    k, cut, text = tuned.gate, tuned.gate_keep, job.text.to(job.clip.device)
    test = job.test
    _, prompted, _ = tuned_view(replace(tuned, gate=None), job.clip, job.text, test.classes, job.templates)  # ungated
    own = cosines(job.clip, prompted, test.images[test.labels == k], text, k)
    others = test.images[test.labels != k]
    real = cosines(job.clip, prompted, job.trigger(others.to(job.clip.device)), text, k)
    hindsight = balanced_cut(real, own, len(text), cfg.keep_weight)
    (fc, pc, cc, lc), (ft, pt, ct, lt) = (_predictions(job.clip, prompted, test.images, text, k, t)
                                          for t in (None, job.trigger))
    gate_statistics = {name: statistic_cost((fc, ft), (pc, pt), pair, test.labels, job.target, k, before["ca"], budget)
                       for name, pair in (("cos", (cc, ct)), ("k_logit", (lc, lt)))}
    gate_statistics["both"] = joint_cost((fc, ft), (pc, pt), (cc, ct), (lc, lt), test.labels, job.target, k,
                                         before["ca"], budget)
    at = lambda c: gated_rates((fc, ft), (pc, pt), (cc, ct), test.labels, job.target, k, c)   # noqa: E731
    points = [(c, *at(c)) for c in CUTS.tolist()]
    best = least_drop(points, before["ca"], budget)
    kept = lambda c, at: round(100 * (c >= at).float().mean().item(), 1) if len(c) else None   # noqa: E731
    return {"name": model["name"], "target": test.classes[k], "ca_before": before["ca"], "ca_after": tuned.after["ca"],
            "asr_after": tuned.after["asr"], "cut": cut, "own_read_k": len(own), "triggered_read_k": len(real),
            "own_median": own.median().item(), "real_q95": torch.quantile(real, 0.95).item() if len(real) else None,
            "own_kept": kept(own, cut), "real_kept": kept(real, cut), "hindsight_cut": hindsight,
            "own_kept_hindsight": kept(own, hindsight), "real_kept_hindsight": kept(real, hindsight),
            "settings": settings or {}, "asr_budget": budget, "frontier": points,
            "frontier_ca_drop": best and best[0], "frontier_cut": best and best[1], "statistics": gate_statistics}


def markdown(rows, cmd, budget):
    lines = ["| model | target | CA drop | cut | own images read k | kept at cut | real-trigger cos q95 | own cos median | "
             "hindsight cut | own kept (hindsight) | triggered kept (hindsight) | least CA drop at ASR <= budget "
             "(its cut) |", "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['target']} | {r['ca_before'] - r['ca_after']:.2f} | {r['cut']:.3f} | "
                     f"{r['own_read_k']} | {r['own_kept']}% | {r['real_q95']:.3f} | {r['own_median']:.3f} | "
                     f"{r['hindsight_cut']:.3f} | {r['own_kept_hindsight']}% | {r['real_kept_hindsight']}% | "
                     + (f"{r['frontier_ca_drop']:.2f} ({r['frontier_cut']:.3f}) |" if r.get("frontier_ca_drop")
                        is not None else "none |"))
    gaps = [r["cut"] - r["real_q95"] for r in rows if r["real_q95"] is not None]
    drops = [r["ca_before"] - r["ca_after"] for r in rows]
    frontier = [r["frontier_ca_drop"] for r in rows if r.get("frontier_ca_drop") is not None]
    reach = (f"Median CA drop {statistics.median(drops):.2f} at the cuts chosen on the shots; "
             f"{statistics.median(frontier):.2f} (median) at the frontier, which {len(frontier)} of {len(rows)} "
             f"models reach. ") if frontier else ""
    return ("\n".join(lines) + "\n\nOn the test images the frozen model reads as the suspected target k: the "
            "target class's own images and the other classes' images with the real trigger; cos(prompted, frozen "
            "feature) at or above the cut keeps the frozen answer. The cut sits "
            f"{statistics.median(gaps):.3f} (median) above the real trigger's 0.95 quantile. The last column: over "
            f"a grid of cuts with these prompts, the least CA drop at which the ASR stays within the budget "
            f"({budget}%). {reach}Lab CLIP numbers (`{cmd}`).\n" + statistic_table(rows, budget))


def statistic_table(rows, budget):
    """The gate's statistic against another: the class-k logit's change (rows measured before it have none)."""
    rows = [r for r in rows if "statistics" in r]
    if not rows:
        return ""
    cell = lambda v: "none" if v is None else f"{v:.2f}"   # noqa: E731
    lines = ["| model | AUROC: cos | AUROC: k-logit change | least CA drop, cos | least CA drop, k-logit change | "
             "least CA drop, both |", "|---" * 6 + "|"]
    for r in rows:
        c, lk = r["statistics"]["cos"], r["statistics"]["k_logit"]
        both = cell(r["statistics"]["both"]["frontier_ca_drop"]) if "both" in r["statistics"] else "-"
        lines.append(f"| {r['name']} | {c['auroc']:.3f} | {lk['auroc']:.3f} | {cell(c['frontier_ca_drop'])} | "
                     f"{cell(lk['frontier_ca_drop'])} | {both} |")
    better = sum(r["statistics"]["cos"]["auroc"] >= r["statistics"]["k_logit"]["auroc"] for r in rows)
    medians = []
    for name in ("cos", "k_logit", "both"):
        drops = [r["statistics"][name]["frontier_ca_drop"] for r in rows if name in r["statistics"]
                 and r["statistics"][name]["frontier_ca_drop"] is not None]
        if drops:
            medians.append(f"{name.replace('_', '-')} {statistics.median(drops):.2f} (n = {len(drops)})")
    return ("\nAnother statistic the gate could cut on: how far the prompts move the class-k logit (prompted - "
            "frozen; the frozen answer kept above the cut) against the cosine it cuts on. AUROC: how well each "
            "tells the target class's own images (above) from really-triggered ones, among the test images the "
            "frozen model reads as k; least CA drop: over 201 cuts at the pooled values' quantiles, with "
            f"ASR <= {budget}% (both: the frozen answer kept only where both statistics are at or above their cuts, "
            f"41 x 41 quantile cuts; all in hindsight, on the test images). The cosine separates at least as well "
            f"on {better} of {len(rows)} models. Median least CA drop where a cut reaches the budget: "
            f"{', '.join(medians) or 'none'}.\n\n"
            + "\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="blind")
    p.add_argument("--models", nargs="+", required=True, help="built zoo models whose cached scan flags them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS), help="folder of bench.zoo's cached cells")
    p.add_argument("--out", default=str(RESULTS / "gate_cost"))
    p.add_argument("--asr-budget", type=float, default=2.0, help="the frontier's ASR %% bound")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="repair settings (bench.zoo's --set)")
    args = p.parse_args(argv)
    settings = parse_settings(args.set, ["repair"], job_fields=())   # the job here is bench.zoo's, fixed
    known = {m["name"]: m for m in split_models(args.split)}
    missing = [n for n in args.models if n not in known or known[n]["checkpoint"] is None]
    if missing:
        raise SystemExit(f"not built in split {args.split!r}: {missing} (python -m engine.lab zoo --split "
                         f"{args.split} --only ...)")
    cache = Path(args.results) / "zoo" / args.split
    rows = []
    for name in args.models:
        row = measure_model(known[name], cache, args.seed, settings, args.asr_budget)
        print(name, "read clean by its cached scan: skipped" if row is None else "done", flush=True)
        rows += [row] if row else []
    cmd = command("bench.gate_cost", argv)
    write_results(args.out, {"command": cmd, "machine": machine(), "models": rows}, markdown(rows, cmd, args.asr_budget))


if __name__ == "__main__":
    main()
