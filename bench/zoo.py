"""The backdoor zoo benchmark: for every model of a split, the scan's verdict and each defense's CA/ASR,
then aggregates. Lab CLIP numbers (Fashion-MNIST), not real CLIP.

    python -m bench.zoo --split dev       # the split hyperparameters and thresholds are chosen on
    python -m bench.zoo --split test      # the reported numbers (never used to choose anything)
    python -m bench.zoo --quick           # CI smoke: the bundled BadNet and clean models, tiny settings

Each (model, cell) result is cached as JSON under bench/results/zoo/<split>/, so an interrupted run
resumes (delete a file to redo a cell). Models whose checkpoint is not built yet (python -m engine.lab zoo)
are skipped and listed. The dev split also holds the bundled lab models (they set the earlier defaults).
Writes bench/results/zoo_<split>.json, .md and .png (CA drop vs ASR after, one marker per defense and model).
"""
import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from engine import manifest, purify, zoo
from engine.evaluate import evaluate_attack
from engine.io import atomic_path, write_json
from engine.job import JobConfig, defend, measure, prepare
from engine.purify import DEFENSES
from engine.inversion.detect import conclude, detect, load_tensors, save_tensors

from .common import command, machine, pyplot, save_figure

RESULTS = Path("bench/results")
DEFENSE_ORDER = ["repair", "rvpt", "cbpt"]
LABELS = {"repair": "repair (detect + distilled VPT)", "rvpt": "RVPT", "cbpt": "CBPT", "vpt": "deep VPT"}
ASR_OK = 5.0
BACKDOOR_TOOK = 80.0   # no-defense ASR at or above which a poisoned model counts as backdoored
BACKDOOR_WEAK = 20.0   # ... and below which it behaves clean (a control); in between it is a weak backdoor
QUICK_EPOCHS = {"repair": 2, "rvpt": 2, "cbpt": 10, "vpt": 2}


def bundled_models():
    """The bundled lab models as zoo-style entries (dev split only)."""
    out = []
    for name, entry in manifest.models().items():
        if not manifest.bundled(entry):
            continue
        out.append({"name": f"bundled-{name}", "checkpoint": str(manifest.checkpoint(entry)),
                    "attack": None if name == "clean" else name, "target": entry.get("target"),
                    "no_defense_asr": entry.get("asr")})
    return out


def zoo_models(split):
    out = []
    for rec in zoo.records(split):
        ck = zoo.checkpoint_path(rec["name"])
        out.append({"name": rec["name"], "checkpoint": str(ck) if ck.is_file() else None, "record": rec,
                    "family": rec["trigger"]["family"] if rec["trigger"] else "clean", "target": rec["target"],
                    "no_defense_asr": rec["measured"].get("asr")})
    return out


def kind(model):
    """'backdoored' (ASR >= 80%), 'weak' (poisoned, 20-80%: a real but partial backdoor, so flagging it is
    no false positive, yet it is not among the backdoored models the targets count), 'failed' (poisoned,
    ASR < 20%: behaves clean, a control) or 'clean' (a clean fine-tune, a control)."""
    if model.get("attack") is None and model.get("record", {}).get("trigger") is None:
        return "clean"
    asr = model["no_defense_asr"] or 0
    return "backdoored" if asr >= BACKDOOR_TOOK else "weak" if asr >= BACKDOOR_WEAK else "failed"


def job_config(model, shots, eval_limit, seed, settings=None):
    """The model's JobConfig: its checkpoint, and ASR measured with its own trigger and target."""
    cfg = JobConfig(checkpoint=model["checkpoint"], shots=shots, seed=seed, eval_limit=eval_limit, fused=True,
                    unlabelled=(settings or {}).get("unlabelled", 0))
    if "record" in model:
        rec = model["record"]
        # a clean control has no trigger: ASR is measured with a harmless stand-in and not reported
        trig = rec["trigger"] or {"family": "patch", "size": 3, "position": [29, 29], "pattern": "noise", "seed": 0}
        return replace(cfg, trigger_spec=json.dumps(trig), target=rec["target"] or "bag")
    return replace(cfg, attack=model["attack"] or "badnet", target=model["target"] or "bag")


def run_model(model, defenses, cache, shots, eval_limit, seed, quick, log, scan_cell=True, cached_only=False,
              settings=None):
    """Every cell of one model, each read from the cache or computed and cached (cached_only: cells that are
    missing or stale are left out, not computed, so no checkpoint is needed). `settings`: --set's overrides
    {field: value}."""
    settings = settings or {}
    cells = {}
    job = scan_cached = None
    for cell in ["none"] + (["scan"] if scan_cell else []) + defenses:
        path = cache / model["name"] / f"{cell}.json"
        if cached_only and not path.is_file():
            continue
        if path.is_file():
            cached = json.loads(path.read_text())
            tensors = cache / model["name"] / "scan.safetensors"
            if cell == "scan" and tensors.is_file() and needs_remask(cached, quick) and not cached_only:
                job = job or prepare(job_config(model, shots, eval_limit, seed, settings), log=lambda *a: None)
                cached = remask_scan(job, cached, tensors, quick, cache / model["name"] / "repair.json")
                write_json(path, cached)
                log(f"{model['name']}: mask evidence again: {cached['verdict']} ({cached['suspected_target']})")
            moved = cell == "scan" and stale(cached, quick)
            if cell == "scan" and not moved:
                recutted = recut(cached, quick, cache / model["name"] / "repair.json")
                if recutted is not cached:
                    write_json(path, recutted)
                    log(f"{model['name']}: scan under today's cuts: {recutted['verdict']} "
                        f"({recutted['suspected_target']})")
                cached = recutted
            if cell == "scan" and (moved or not (tensors.is_file() or cached_only)):
                # inversion settings moved (or the inverted triggers were not kept): detect again, repair again
                if cached_only:
                    continue
                (cache / model["name"] / "repair.json").unlink(missing_ok=True)
            elif cell not in ("none", "scan") and stale_defense(cell, cached, quick, seed, settings,
                                                                (scan_cached or {}).get("flagged_by", "?")):
                if cached_only:
                    continue                               # the defense's settings moved: tune again (not here)
            else:
                if cell == "scan":
                    cached["score"] = score(cached)   # the current definition, from the stored evidence
                    scan_cached = cached
                cells[cell] = cached
                continue
        if job is None:
            job = prepare(job_config(model, shots, eval_limit, seed, settings), log=lambda *a: None)
        t0 = time.time()
        if cell == "none":
            res = evaluate_attack(job.clip, job.test, job.trigger, job.target, text=job.text)
        elif cell == "scan":
            # engine.scan's default: the detector on the tuning shots (the same the defenses get); the repair
            # cell reuses this detection instead of running it again
            r = job.detection = detect(job.clip, job.train, job.text, detect_config(quick))
            res = scan_record(r, job.test.classes, quick)
            save_tensors(cache / model["name"] / "scan.safetensors", r)   # before scan.json: a scan cell implies them
        else:
            if cell == "repair" and job.detection is None and scan_cached is not None:   # reuse the scan's triggers
                job.detection = conclude(scan_cached, load_tensors(cache / model["name"] / "scan.safetensors"),
                                         detect_config(quick), job.clip.image_size)
            tuned = defend(job, cell, defense_config(cell, quick, seed, settings))
            res = {**tuned.after, "tune_seconds": round(tuned.seconds, 2), **tuned.extra,
                   "config": json.loads(json.dumps(tuned.config)), "unlabelled": settings.get("unlabelled", 0)}
        res["seconds"] = round(time.time() - t0, 2)
        if cell not in ("none", "scan") and tuned.gate is not None:
            # the same prompts on every image: what the gate saves (an extra evaluation, not the defense's time)
            res["ungated"] = measure(job, replace(tuned, gate=None))
        write_json(path, res)
        cells[cell] = res
        log(f"{model['name']}: {cell} " + (f"{res['verdict']} ({res['suspected_target']})" if cell == "scan" else
                                         f"CA {res['ca']:.2f} ASR {res['asr']:.2f}") + f"  {res['seconds']:.0f} s")
    return cells


def defense_config(cell, quick, seed, settings=None):
    """The defense's config with --set FIELD=VALUE overrides of its fields (a sweep on the dev split); the
    field `unlabelled` is the job's instead: extra clean train images without labels (engine.job.JobConfig)."""
    cfg = purify.config(cell, "lab-vit", epochs=QUICK_EPOCHS[cell] if quick else None, seed=seed)
    return replace(cfg, **{k: v for k, v in (settings or {}).items() if hasattr(cfg, k) and k != "unlabelled"})


def parse_settings(texts, defenses, job_fields=("unlabelled",)):
    """--set's FIELD=VALUE texts as a dict; SystemExit naming any field that none of `defenses` (nor the job's
    `job_fields`) has."""
    settings = dict(parse_setting(t) for t in texts)
    unknown = [k for k in settings if k not in job_fields
               and not any(hasattr(purify.config(d, "lab-vit"), k) for d in defenses)]
    if unknown:
        raise SystemExit(f"--set: no defense among {list(defenses)} has the field(s) {unknown}")
    return settings


def split_models(split):
    """The zoo's models of `split`, and on the dev split the bundled lab models before them."""
    return (bundled_models() if split == "dev" else []) + zoo_models(split)


def parse_setting(text):
    """One --set FIELD=VALUE as (field, value), the value read as JSON (numbers, true/false) or else kept
    as a string (bench.detect_cuts's --set reads its cuts with it too)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set takes FIELD=VALUE (e.g. epochs=50), not {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def stale_defense(cell, cached, quick, seed, settings=None, flagged_by="?"):
    """True when a cached defense cell was tuned with other settings than the defense's current ones (a
    repair cell without its settings recorded counts as stale; older RVPT/CBPT cells are kept).
    `flagged_by`: the cached scan's flagging family ("?": unknown), for the settings that only apply to some."""
    if "config" not in cached:
        return cell == "repair"
    current = defense_config(cell, quick, seed, settings)
    if cell == "repair" and cached.get("repaired") is False and not cached["config"].get("always") and \
            not current.always:
        return False   # the scan read the model clean: nothing was tuned, and no tuning setting changes that
    settings = settings or {}
    if cached.get("unlabelled", 0) != settings.get("unlabelled", 0):
        return True
    return not _same(_without_cuts(cached["config"], flagged_by),
                     _without_cuts(json.loads(json.dumps(current.as_dict())), flagged_by))


def _without_cuts(cfg, flagged_by="?"):
    """A defense config without the detector's thresholds and mask recheck: a repair whose verdict, flagging
    family and trigger they do not change (recut() and remask_scan() check that) is the same repair. Nor
    does `also_mask` change a repair the mask flagged (or none), nor `keep_each` one with a single stand-in."""
    if isinstance(cfg, dict) and flagged_by in (None, "mask"):
        single = not cfg.get("extra")
        cfg = {k: v for k, v in cfg.items() if k != "also_mask" and not (single and k == "keep_each")}
    if isinstance(cfg, dict) and "detect" in cfg:
        det = {k: v for k, v in cfg["detect"].items() if not k.startswith("min_")}
        if isinstance(det.get("mask"), dict):
            det["mask"] = {k: v for k, v in det["mask"].items() if not k.startswith("recheck_")}
        cfg = {**cfg, "detect": det}
    return cfg


def scan_record(result, classes, quick):
    """What a scan cell stores of detect()'s result (its tensors go to scan.safetensors)."""
    return {"verdict": result["verdict"], "suspected_target": classes[result["suspected_target"]],
            "flagged_by": result["flagged_by"], "score": score(result), "mask": result["mask"],
            "stripes": result["stripes"], "warp": result["warp"], "inversion": inversion_settings(detect_config(quick))}


# The mask inversion's own settings: a scan whose cached settings differ only in these keeps its stripe and
# warp evidence (they never read them) and needs only its mask evidence again (remask_scan).
MASK_ONLY = ("steps", "lr", "lam", "adaptive", "success", "lam_factor", "strengthen_steps", "recheck_top",
             "recheck_seeds", "mask_init")


def needs_remask(scan_cell, quick):
    """True when the cached scan ran under today's inversion settings except the mask inversion's own
    (MASK_ONLY): its mask evidence alone is out of date."""
    now = inversion_settings(detect_config(quick))
    cached = scan_cell.get("inversion")
    if not isinstance(cached, dict) or not isinstance(cached.get("mask"), dict) or _same(cached, now):
        return False

    def keep(settings):   # a cell from before warp_steps existed ran its warps for the mask's steps
        mask = settings["mask"]
        return {**settings, "mask": {**{k: v for k, v in mask.items() if k not in MASK_ONLY},
                                     "warp_steps": mask.get("warp_steps", mask.get("steps"))}}
    return _same(keep(cached), keep(now))


def remask_scan(job, cached, tensors_path, quick, repair_path):
    """The cached scan with its mask evidence inverted again under today's settings, its stripe and warp
    evidence and tensors kept; the tensors rewritten. The repair cell, which reads the mask trigger (the
    flagged one or a stand-in), is dropped unless the model reads clean before and after (nothing tuned)."""
    from engine.evaluate import predict
    from engine.inversion.detect import mask_evidence
    cfg = detect_config(quick)
    tensors = load_tensors(tensors_path)
    clean_pred = predict(job.clip, job.train.images, job.text)   # the probe is the shots (engine.scan's default)
    ev, (m, p) = mask_evidence(job.clip, job.train, job.text, cfg.mask, job.train, clean_pred)
    tensors.update(mask=m.cpu().contiguous(), pattern=p.cpu().contiguous())
    r = conclude({"mask": ev, "stripes": cached["stripes"], "warp": cached.get("warp")}, tensors, cfg,
                 job.clip.image_size)
    res = scan_record(r, job.test.classes, quick)
    if (cached["verdict"], res["verdict"]) != ("clean", "clean"):
        repair_path.unlink(missing_ok=True)
    save_tensors(tensors_path, r)
    return {**res, "seconds": round(cached.get("seconds", 0) + ev["seconds"] - cached["mask"]["seconds"], 2)}


def inversion_settings(cfg):
    """The part of a DetectConfig the evidence depends on (the thresholds are applied afresh to it)."""
    return {k: v for k, v in cfg.as_dict().items() if not k.startswith("min_")}


# Config fields added after cells were cached, each with the value that does what the code did before the
# field existed: a cached cell without the field ran with that value (not with today's default).
ADDED_FIELDS = {"adv_steps": 1, "extra": [], "extra_steps": 100, "blend_alpha": 0.2, "gate": False,
                "bounded_eps": 0.1, "clean_focus": 0.0, "adv_mask": True,
                "w_clean_ce": 0.0, "also_mask": False, "keep_quantile": 0.0, "keep_each": False, "w_extra": None,
                "keep_weight": 0.0, "keep_from": "all", "clean_ce_labels": False, "clean_ce_soft": False, "keep_cap": 0.0,
                "recheck_top": 0, "recheck_seeds": 2,   # no recheck (any seed count then does the same)
                "warp_steps": 100}                      # the warp inversion ran the mask's steps, then 100


def _same(stored, current):
    """Settings equal, where a field added since the cell was stored (absent there) counts as unchanged
    while it holds the value that reproduces the older behaviour (ADDED_FIELDS)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return set(stored) <= set(current) and all(
            _same(stored[k], v) if k in stored else k in ADDED_FIELDS and v == ADDED_FIELDS[k]
            for k, v in current.items())
    return stored == current


def stale(scan_cell, quick):
    """True when the cached scan's evidence came from other inversion settings."""
    return not _same(scan_cell.get("inversion"), inversion_settings(detect_config(quick)))


def recut(scan_cell, quick, repair_path):
    """The cached scan under today's thresholds (decide() on its stored evidence: the inversions need not
    run again); when the flagging family moves, the repair cell, which read the old one, is dropped."""
    from engine.inversion.detect import decide
    verdict, _, family = decide(scan_cell["mask"], scan_cell["stripes"], detect_config(quick), scan_cell.get("warp"))
    if family == scan_cell["flagged_by"]:
        return scan_cell
    repair_path.unlink(missing_ok=True)
    target = scan_cell[{"stripes": "stripes", "warp": "warp"}.get(family, "mask")]["target"]
    return {**scan_cell, "verdict": verdict, "flagged_by": family, "suspected_target": target}


def detect_config(quick):
    from engine.inversion.detect import DetectConfig
    base = DetectConfig()
    if not quick:
        return base
    return replace(base, mask=replace(base.mask, steps=5, warp_steps=5), stripes=replace(base.stripes, steps=5))


def score(result):
    """One number per scan for the AUROC: how far past its thresholds the stronger family is (>= 1 flags)."""
    from engine.inversion.detect import DetectConfig
    cfg = DetectConfig()
    m = result["mask"]
    s = min(m["anomaly_index"] / cfg.min_mask_anomaly, m.get("log_gap", 0.0) / cfg.min_mask_gap)
    st, wp = result["stripes"], result.get("warp")
    if st:
        s = max(s, min(st["target_share"] / cfg.min_stripe_share, st["anomaly_index"] / cfg.min_stripe_anomaly))
    if wp:
        s = max(s, min(wp["target_share"] / cfg.min_warp_share, wp["anomaly_index"] / cfg.min_warp_anomaly))
    return s


def auroc(pos, neg):
    """P(score of a backdoored model > score of a clean one), ties count half."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def aggregate(rows, defenses):
    """Scan TPR / FP / AUROC / target accuracy and per-defense summaries over the backdoored models, and the
    CA drop each defense costs on the clean (and failed-poison) controls; weak backdoors apart (flagging one
    is no false positive; each defense's ASR on them is reported, not counted in the targets)."""
    bd = [r for r in rows if r["kind"] == "backdoored"]
    ctrl = [r for r in rows if r["kind"] in ("clean", "failed")]
    weak = [r for r in rows if r["kind"] == "weak"]
    flagged = [r for r in bd if r["cells"]["scan"]["verdict"] == "backdoored"]
    scan_summary = {
        "backdoored": len(bd), "controls": len(ctrl),
        "detected": len(flagged), "tpr": len(flagged) / len(bd) if bd else None,
        "false_positives": sum(r["cells"]["scan"]["verdict"] == "backdoored" for r in ctrl),
        "weak": len(weak), "weak_flagged": sum(r["cells"]["scan"]["verdict"] == "backdoored" for r in weak),
        "auroc": auroc([r["cells"]["scan"]["score"] for r in bd], [r["cells"]["scan"]["score"] for r in ctrl]),
        "target_right": sum(r["cells"]["scan"]["suspected_target"] == r["target"] for r in flagged),
        "median_seconds": statistics.median(r["cells"]["scan"]["seconds"] for r in rows) if rows else None,
    }
    per_defense = {}
    for d in defenses:   # over the models that have the defense's cell (all of them unless --cached-only)
        asr = [r["cells"][d]["asr"] for r in bd if d in r["cells"]]
        drop = [r["cells"]["none"]["ca"] - r["cells"][d]["ca"] for r in bd if d in r["cells"]]
        cdrop = [r["cells"]["none"]["ca"] - r["cells"][d]["ca"] for r in ctrl if d in r["cells"]]
        per_defense[d] = {"backdoored_measured": len(asr), "controls_measured": len(cdrop),
            "asr_ok_share": sum(a <= ASR_OK for a in asr) / len(asr) if asr else None,
            "median_asr": statistics.median(asr) if asr else None, "worst_asr": max(asr) if asr else None,
            "median_ca_drop": statistics.median(drop) if drop else None, "worst_ca_drop": max(drop) if drop else None,
            "control_median_ca_drop": statistics.median(cdrop) if cdrop else None,
            "control_worst_ca_drop": max(cdrop) if cdrop else None,
            "weak_median_asr": statistics.median(wasr) if (wasr := [r["cells"][d]["asr"] for r in weak if d in r["cells"]])
            else None,
            "median_seconds": statistics.median(r["cells"][d]["seconds"] for r in rows if d in r["cells"])
            if asr or cdrop else None,
        }
    # what one run of every cell costs (each as measured, some cells two side by side on the cores)
    cell_minutes = {c: sum(r["cells"][c].get("seconds", 0) for r in rows if c in r["cells"]) / 60
                    for c in ["none", "scan", *defenses]}
    return {"scan": scan_summary, "defenses": per_defense, "cell_minutes": cell_minutes}


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(round(v, 6) + 0.0)   # + 0.0: no "-0.00" from rounding noise


def markdown(split, rows, agg, defenses, missing, cmd, seconds):
    s = agg["scan"]
    lines = [f"Zoo split `{split}`: {s['backdoored']} backdoored models (no-defense ASR >= {BACKDOOR_TOOK:.0f}%), "
             f"{s['weak']} weak backdoors ({BACKDOOR_WEAK:.0f}-{BACKDOOR_TOOK:.0f}%: flagging one is no false positive, "
             f"the targets do not count them), {s['controls']} controls (clean fine-tunes and poisoned models whose "
             f"backdoor did not take, < {BACKDOOR_WEAK:.0f}%).", "",
             "| scan | detected | false positives | weak flagged | AUROC | target right | median s |", "|---" * 7 + "|",
             f"| {split} | {s['detected']}/{s['backdoored']} | {s['false_positives']}/{s['controls']} | "
             f"{s['weak_flagged']}/{s['weak']} | {_f(s['auroc'])} | {s['target_right']}/{s['detected']} | "
             f"{_f(s['median_seconds'], '{:.0f}')} |", "",
             f"| defense | measured on | ASR <= {ASR_OK:.0f}% | median ASR | worst ASR | median CA drop | worst CA drop | "
             "controls: median CA drop | worst | weak: median ASR | median s |", "|---" * 11 + "|"]
    for d in defenses:
        a = agg["defenses"][d]
        lines.append(f"| {LABELS.get(d, d)} | {a['backdoored_measured']}/{s['backdoored']} + "
                     f"{a['controls_measured']}/{s['controls']} | {_f(a['asr_ok_share'] and 100 * a['asr_ok_share'], '{:.0f}%')} | "
                     f"{_f(a['median_asr'])} | {_f(a['worst_asr'])} | {_f(a['median_ca_drop'])} | "
                     f"{_f(a['worst_ca_drop'])} | {_f(a['control_median_ca_drop'])} | {_f(a['control_worst_ca_drop'])} | "
                     f"{_f(a.get('weak_median_asr'))} | {_f(a['median_seconds'], '{:.0f}')} |")
    lines += ["", "| model | family | target | kind | no defense ASR (CA) | scan | "
              + " | ".join(LABELS.get(d, d) for d in defenses) + " |", "|---" * (6 + len(defenses)) + "|"]
    for r in rows:
        c = r["cells"]
        sc = c["scan"]
        lines.append(f"| {r['name']} | {r['family']} | {r['target'] or '-'} | {r['kind']} | "
                     f"{c['none']['asr']:.1f} ({c['none']['ca']:.1f}) | {sc['verdict']} ({sc['suspected_target']}, "
                     f"{sc['score']:.2f}) | " + " | ".join(f"{c[d]['asr']:.1f} ({c[d]['ca']:.1f})" if d in c else "-" for d in defenses) + " |")
    if missing:
        lines += ["", f"Not built yet (skipped): {', '.join(missing)}."]
    run = "tables from cached cells" if seconds is None else f"whole run {seconds:.0f} s"
    minutes = agg["cell_minutes"]
    run = (f"Cells' seconds summed: {sum(minutes.values()):.0f} min (" +
           ", ".join(f"{LABELS.get(c, c).split(' (')[0]} {m:.0f}" for c, m in minutes.items()) + "; each as measured, "
           "some two side by side on the cores); " + run)
    lines += ["", f"ASR % (CA %) on the first test images per model; ASR of controls is measured with a stand-in "
              f"trigger and means nothing. The repair's seconds leave out its detection (the scan's, reused). "
              f"Scan score: how far past its thresholds the strongest family is (>= 1 flags). {run} (`{cmd}`)."]
    return "\n".join(lines) + "\n"


def plot(rows, defenses, path, split):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = dict(zip(defenses, "os^Dv"))
    for d in defenses:
        pts = [(r["cells"]["none"]["ca"] - r["cells"][d]["ca"], r["cells"][d]["asr"]) for r in rows
               if r["kind"] == "backdoored" and d in r["cells"]]
        if pts:
            ax.scatter(*zip(*pts), marker=markers[d], label=LABELS.get(d, d), alpha=0.7)
    ax.axhline(ASR_OK, color="grey", lw=0.8, ls="--")
    ax.axvline(3, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("CA drop (points)")
    ax.set_ylabel("ASR after (%)")
    ax.set_title(f"Backdoor zoo, {split} split (lab CLIP): one marker per defense and model", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _shard(text):
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard takes I/N (e.g. 0/2), not {text!r}")
    if not 0 <= i < n:
        raise SystemExit(f"--shard {text}: I must be in 0..N-1")
    return i, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test", choices=list(zoo.SPLITS))
    p.add_argument("--defenses", nargs="+", default=DEFENSE_ORDER, choices=sorted(DEFENSES))
    p.add_argument("--models", nargs="+", default=None, help="only these model names")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run every N-th model from the I-th (0-based) only, e.g. two processes with 0/2 and 1/2; "
                        "then --cached-only merges their cells into the tables")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--eval-limit", type=int, default=2000, help="test images per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CI smoke run: bundled badnet + clean, tiny settings")
    p.add_argument("--results", default=str(RESULTS), help="folder of the result files")
    p.add_argument("--cached-only", action="store_true",
                   help="tables from the cached cells only: models with a missing cell are listed, not run")
    p.add_argument("--skip-scan", action="store_true",
                   help="only fill the cache with the given defenses' cells (no scan, no tables); the repair needs the scan")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override these config fields of the defenses that have them (a dev-split sweep; use "
                        "another --results folder so the cached defaults stay)")
    args = p.parse_args(argv)
    settings = parse_settings(args.set, args.defenses)
    t0 = time.time()
    results = Path(args.results)
    if args.quick:
        split, shots, eval_limit = "quick", 4, 300
        models = [m for m in bundled_models() if m["name"] in ("bundled-badnet", "bundled-clean")]
    else:
        split, shots, eval_limit = args.split, args.shots, args.eval_limit
        models = split_models(split)
    if args.models:
        models = [m for m in models if m["name"] in args.models]
    if args.shard:
        i, n = _shard(args.shard)
        models = models[i::n]
    recorded = {m["name"] for m in models}
    missing = [s["name"] + " (no record: not built)" for s in (zoo.specs(split) if split in zoo.SPLITS else [])
               if s["name"] not in recorded and (not args.models or s["name"] in args.models)]
    cache = results / "zoo" / split
    cells_needed = ["none", "scan"] + args.defenses[:1]   # the first defense everywhere; others where measured
    if args.cached_only:  # aggregate what earlier runs finished (no checkpoint needed); list the rest as not run
        done = [m for m in models if all((cache / m["name"] / f"{c}.json").is_file() for c in cells_needed)]
        missing += [m["name"] + " (not run yet)" for m in models if m not in done]
        models = done
    else:
        missing = [m["name"] for m in models if m["checkpoint"] is None] + missing
        models = [m for m in models if m["checkpoint"] is not None]
    rows = []
    for m in models:
        cells = run_model(m, args.defenses, cache, shots, eval_limit, args.seed, args.quick, print,
                          scan_cell=not args.skip_scan, cached_only=args.cached_only, settings=settings)
        if not all(c in cells for c in cells_needed if c != "scan" or not args.skip_scan):
            missing.append(m["name"] + " (cached cells stale: run again without --cached-only)")
            continue
        rows.append({"name": m["name"], "family": m.get("family", m.get("attack") or "clean"), "target": m["target"],
                     "kind": kind(m), "cells": cells})
    if args.skip_scan or args.shard:   # a part of the run: the merging --cached-only run writes the tables
        return None
    agg = aggregate(rows, args.defenses)
    seconds, cmd = None if args.cached_only else round(time.time() - t0, 1), command("bench.zoo", argv)
    out = results / f"zoo_{split}"
    write_json(str(out) + ".json", {"command": cmd, "machine": machine(), "split": split, "shots": shots,
                                    "eval_limit": eval_limit, "seed": args.seed, "seconds": seconds,
                                    "aggregate": agg, "missing": missing, "models": rows})
    md = markdown(split, rows, agg, args.defenses, missing, cmd, seconds)
    with atomic_path(Path(str(out) + ".md")) as tmp:
        tmp.write_text(md)
    plot(rows, args.defenses, Path(str(out) + ".png"), split)
    print(md)
    return agg


if __name__ == "__main__":
    main()
