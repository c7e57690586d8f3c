"""Is this model backdoored, towards which class, and with what trigger? Two targeted inversions over
every class, each followed by an outlier test over the classes:

- mask (engine.inversion.targeted): the smallest stamped mask + pattern sending the other classes'
  shots to k; a backdoor target needs a far smaller mask (its log size well below the median of the
  other classes' and an outlier among them by the MAD anomaly index);
- stripes (engine.inversion.stripes): one faint 1-D pattern per orientation and class; a backdoor keyed
  to a global periodic signal makes its target far easier to reach (share of probe images sent there);
- warps (engine.inversion.targeted.WarpFamily): one smooth warp of bounded shift per class (WaNet-like
  triggers), the same share statistic.

Used by engine.scan (probe = held-out clean images) and the repair defense (probe = the shots). The
thresholds are chosen on the zoo's dev split (bench/zoo.py --split dev); see DetectConfig."""
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .. import distributed
from ..evaluate import predict
from ..io import atomic_path
from . import stripes as stripe_inversion
from . import targeted

MAD_FLOOR = 0.01    # a share is measured to ~1 point: no smaller spread counts


@dataclass
class DetectConfig:
    mask: targeted.TargetedConfig = field(default_factory=targeted.TargetedConfig)
    stripes: stripe_inversion.StripeConfig = field(default_factory=stripe_inversion.StripeConfig)
    use_stripes: bool = True
    use_warps: bool = True
    # Cuts chosen on the zoo's dev split from its clean controls only (what a defender can build: clean
    # fine-tunes); weak backdoors (20-80% ASR) are not controls: flagging one is right. The effect sizes
    # (the mask gap, the stripe and warp flip shares) sit 3 SDs above the 11 dev controls' mean
    # (bench/results/detect_cuts_dev.md: the largest of 3 controls, which set them before, sat below other
    # splits' controls); the MAD z-scores (anomaly indices) keep the cuts they had. A family flags
    # only when both of its checks pass.
    min_mask_gap: float = 0.35          # log(median other class's mask / smallest mask) ...
    min_mask_anomaly: float = 2.0       # ... and that smallest mask this many MADs below the others' (log sizes)
    min_stripe_share: float = 0.53
    min_stripe_anomaly: float = 2.0
    min_warp_share: float = 0.57
    min_warp_anomaly: float = 3.0

    def as_dict(self):
        return asdict(self)


def flip_shares(labels, clean_pred, trig_pred, n_classes):
    """Per class k: of the probe images neither labelled k nor predicted k when clean, the share the
    trigger sends to k."""
    shares = []
    for k in range(n_classes):
        pool = (labels != k) & (clean_pred != k)
        shares.append((trig_pred[pool] == k).float().mean().item() if pool.any() else 0.0)
    return shares


def per_candidate(n, value_of):
    """[value_of(i) for i in range(n)], each torchrun rank computing its contiguous share (one process: all)."""
    lo, hi = distributed.bounds(n)
    mine = torch.tensor([float(value_of(i)) for i in range(lo, hi)], dtype=torch.float64)
    return distributed.fill_rows(mine, n, lo).tolist()


def anomaly_index(shares, k, floor=MAD_FLOOR):
    """MAD z-score of class k's share against the other classes' shares (Neural Cleanse style)."""
    others = [s for i, s in enumerate(shares) if i != k]
    med = statistics.median(others)
    mad = 1.4826 * statistics.median(abs(s - med) for s in others)
    return (shares[k] - med) / max(mad, floor)


def mask_evidence(clip, few, text, cfg, probe, clean_pred, progress=False):
    """One mask inversion over every class (the smallest mask's class, its anomaly and its strengthened
    trigger), then recheck_mask on its closest candidates."""
    t0 = time.time()
    (masks, patterns), sizes, _ = targeted.invert(clip, few.images, few.labels, text, cfg, progress=progress)
    k, anomaly = targeted.log_outlier(sizes)
    m, p, trigger_size = _strengthen(clip, few, text, cfg, k, masks[k], patterns[k])
    first = {"target": few.classes[k], "target_index": k, "anomaly_index": anomaly,
             "target_share": _mask_share(clip, probe, text, clean_pred, k, m, p),
             "log_gap": targeted.log_gap(sizes, k), "mask_size": sizes[k], "trigger_size": trigger_size,
             "sizes": dict(zip(few.classes, sizes)), "seconds": round(time.time() - t0, 2)}
    return recheck_mask(clip, few, text, cfg, probe, clean_pred, first, (m, p), progress)


def recheck_mask(clip, few, text, cfg, probe, clean_pred, first, trigger, progress=False):
    """`first`: one inversion run's evidence (mask_evidence's format), `trigger` its (m, p). The
    cfg.recheck_top classes with the smallest masks are inverted again from cfg.recheck_seeds other seeds
    (one batch); their sizes become the mean over the runs: one run's smallest mask is biased low, and
    its ranking of near classes is seed noise (on dev the same class's mask varied by 10-30% between
    seeds). The target is the candidate with the smallest mean; a changed target takes its smallest
    restart's trigger, strengthened. Returns (evidence, (m, p)); recheck_top 0 returns `first` as it is."""
    if not cfg.recheck_top or not cfg.recheck_seeds:
        return first, trigger
    t0 = time.time()
    sizes = [first["sizes"][c] for c in few.classes]
    top = sorted(range(len(sizes)), key=sizes.__getitem__)[:cfg.recheck_top]
    again = replace(cfg, seed=cfg.seed + 1)
    rows = top * cfg.recheck_seeds   # every candidate once per seed, all in one batch
    (masks, patterns), restart_sizes, _ = targeted.invert(clip, few.images, few.labels, text, again, classes=rows,
                                                          progress=progress)
    runs = {c: [sizes[c]] + restart_sizes[i::len(top)] for i, c in enumerate(top)}
    for c in top:
        sizes[c] = statistics.fmean(runs[c])
    k = min(top, key=sizes.__getitem__)
    ev = {**first, "target": few.classes[k], "target_index": k, "anomaly_index": targeted.anomaly_low(
        [math.log(max(v, 1e-6)) for v in sizes], k), "log_gap": targeted.log_gap(sizes, k), "mask_size": sizes[k],
        "sizes": dict(zip(few.classes, sizes)), "first_run": {"target": first["target"], "sizes": first["sizes"]},
        "restart_sizes": {few.classes[c]: runs[c][1:] for c in top}}
    if k != first["target_index"]:
        best = min((i for i, c in enumerate(rows) if c == k), key=restart_sizes.__getitem__)
        m, p, ev["trigger_size"] = _strengthen(clip, few, text, cfg, k, masks[best], patterns[best])
        ev["target_share"] = _mask_share(clip, probe, text, clean_pred, k, m, p)
        trigger = (m, p)
    ev["seconds"] = round(first["seconds"] + time.time() - t0, 2)
    return ev, trigger


def _strengthen(clip, few, text, cfg, k, m, p):
    if not cfg.strengthen_steps:
        return m, p, float(m.sum())
    return targeted.refine(clip, few.images, few.labels, text, k, m, p, cfg, lam_factor=1.0,
                           steps=cfg.strengthen_steps)


def _mask_share(clip, probe, text, clean_pred, k, m, p):
    trig = predict(clip, probe.images, text, transform=lambda x: targeted.stamp(x, m.to(x), p.to(x)))
    return flip_shares(probe.labels, clean_pred, trig, len(text))[k]


def stripe_evidence(clip, few, text, cfg, probe, clean_pred, progress=False):
    """The (orientation, class) whose pattern sends the largest share of the probe images to its class,
    that share's anomaly index among its orientation's classes, and every share."""
    t0 = time.time()
    patterns, _ = stripe_inversion.invert_stripes(clip, few.images, text, cfg, progress)
    K, orientations = len(few.classes), list(patterns)

    def share(i):
        o, k = divmod(i, K)
        p = patterns[orientations[o]][k]
        return flip_shares(probe.labels, clean_pred, predict(clip, probe.images, text,
                           transform=lambda x: stripe_inversion.add_pattern(x, p)), K)[k]
    flat = per_candidate(len(orientations) * K, share)
    shares = {o: flat[i * K:(i + 1) * K] for i, o in enumerate(orientations)}
    o, k = max(((o, k) for o in shares for k in range(len(few.classes))), key=lambda ok: shares[ok[0]][ok[1]])
    return {"orientation": o, "target": few.classes[k], "target_index": k, "target_share": shares[o][k],
            "anomaly_index": anomaly_index(shares[o], k),
            "shares": {o: dict(zip(few.classes, s)) for o, s in shares.items()},
            "seconds": round(time.time() - t0, 2)}, patterns[o][k]


def warp_evidence(clip, few, text, cfg, probe, clean_pred, progress=False):
    """Per class, one smooth warp of bounded shift towards it (targeted.WarpFamily); the class whose warp
    sends the largest share of the probe images there, and that share's anomaly index."""
    t0 = time.time()
    (grids, _), _, _ = targeted.invert(clip, few.images, few.labels, text, cfg, progress=progress, family="warp",
                                       steps=cfg.warp_steps)
    shares = per_candidate(len(few.classes), lambda k: flip_shares(
        probe.labels, clean_pred, predict(clip, probe.images, text, transform=lambda x: targeted.warp(x, grids[k])),
        len(few.classes))[k])
    k = max(range(len(shares)), key=shares.__getitem__)
    return {"target": few.classes[k], "target_index": k, "target_share": shares[k],
            "anomaly_index": anomaly_index(shares, k), "shares": dict(zip(few.classes, shares)),
            "seconds": round(time.time() - t0, 2)}, grids[k]


def decide(mask_ev, stripe_ev, cfg, warp_ev=None):
    """(verdict, {check: passed}, the family that flagged: 'mask', 'stripes', 'warp' or None)."""
    checks = {"mask_anomaly": mask_ev["anomaly_index"] >= cfg.min_mask_anomaly,
              "mask_gap": mask_ev.get("log_gap", 0.0) >= cfg.min_mask_gap}
    if stripe_ev is not None:
        checks["stripe_share"] = stripe_ev["target_share"] >= cfg.min_stripe_share
        checks["stripe_anomaly"] = stripe_ev["anomaly_index"] >= cfg.min_stripe_anomaly
    if warp_ev is not None:
        checks["warp_share"] = warp_ev["target_share"] >= cfg.min_warp_share
        checks["warp_anomaly"] = warp_ev["anomaly_index"] >= cfg.min_warp_anomaly
    family = "mask" if checks["mask_anomaly"] and checks["mask_gap"] else \
        "stripes" if stripe_ev is not None and checks["stripe_share"] and checks["stripe_anomaly"] else \
        "warp" if warp_ev is not None and checks["warp_share"] and checks["warp_anomaly"] else None
    return ("backdoored" if family else "clean"), checks, family


def detect(clip, few, text, cfg, probe=None, progress=False, log=None):
    """Evidence of both inversions and the verdict. `probe`: clean images the inverted triggers are
    measured on (default the shots). Returns conclude()'s dict: {verdict, suspected_target (index),
    flagged_by, checks, mask, stripes, warp, trigger: a callable on [0, 1] images (the flagged family's,
    else the mask's), tensors: the inverted triggers (what save_tensors stores)}."""
    probe = few if probe is None else probe
    clean_pred = predict(clip, probe.images, text)
    mask_ev, (m, p) = mask_evidence(clip, few, text, cfg.mask, probe, clean_pred, progress)
    if log:
        log(f"mask inversion: {mask_ev['target']} mask {mask_ev['mask_size']:.1f} px, anomaly "
            f"{mask_ev['anomaly_index']:.1f}, share {mask_ev['target_share']:.2f}, {mask_ev['seconds']:.0f} s")
    tensors = {"mask": m.cpu(), "pattern": p.cpu()}
    stripe_ev = warp_ev = None
    if cfg.use_stripes:
        stripe_ev, tensors["stripe"] = stripe_evidence(clip, few, text, cfg.stripes, probe, clean_pred, progress)
        if log:
            log(f"stripe inversion: {stripe_ev['orientation']} -> {stripe_ev['target']} share "
                f"{stripe_ev['target_share']:.2f}, anomaly {stripe_ev['anomaly_index']:.1f}, {stripe_ev['seconds']:.0f} s")
    if cfg.use_warps:
        warp_ev, tensors["warp_grid"] = warp_evidence(clip, few, text, cfg.mask, probe, clean_pred, progress)
        if log:
            log(f"warp inversion: {warp_ev['target']} share {warp_ev['target_share']:.2f}, anomaly "
                f"{warp_ev['anomaly_index']:.1f}, {warp_ev['seconds']:.0f} s")
    return conclude({"mask": mask_ev, "stripes": stripe_ev, "warp": warp_ev}, {k: v.cpu() for k, v in tensors.items()},
                    cfg, few.images.shape[-1])


def conclude(evidence, tensors, cfg, size):
    """The verdict and trigger from stored evidence {mask, stripes, warp} and inverted tensors {mask,
    pattern, stripe, warp_grid} under cfg's thresholds: what detect() returns, and what a cached scan
    (bench.zoo) is turned back into without inverting again."""
    mask_ev, stripe_ev, warp_ev = evidence["mask"], evidence.get("stripes"), evidence.get("warp")
    verdict, checks, family = decide(mask_ev, stripe_ev, cfg, warp_ev)
    m, p = tensors["mask"], tensors["pattern"]
    if family == "stripes":
        pattern = tensors["stripe"]
        target, trigger, image = stripe_ev["target_index"], lambda x: stripe_inversion.add_pattern(x, pattern.to(x)), \
            (0.5 + pattern).expand(3, size, size)
    elif family == "warp":
        grid = tensors["warp_grid"]
        checker = ((torch.arange(size)[:, None] // 4 + torch.arange(size) // 4) % 2)
        target, trigger = warp_ev["target_index"], lambda x: targeted.warp(x, grid)
        image = targeted.warp(checker.float().expand(1, 3, -1, -1), grid)[0]   # the warp drawn on a checkerboard
    else:
        target, trigger, image = mask_ev["target_index"], lambda x: targeted.stamp(x, m.to(x), p.to(x)), m * p
    return {"verdict": verdict, "suspected_target": target, "flagged_by": family, "checks": checks,
            "mask": mask_ev, "stripes": stripe_ev, "warp": warp_ev, "trigger": trigger, "trigger_image": image,
            "mask_trigger": (m, p), "stripe_pattern": tensors.get("stripe"), "tensors": tensors}


def save_tensors(path, result):
    """The inverted triggers of a detect() result, atomically (safetensors), for conclude() to reuse."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in result["tensors"].items()}, str(tmp))


def load_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))
