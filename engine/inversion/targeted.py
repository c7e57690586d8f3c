"""Targeted trigger inversion in the style of Neural Cleanse: for every class k, the smallest stamped
mask m_k with pattern P_k, x' = (1 - m) x + m P, that sends the few shots of the other classes to k
under the model's zero-shot classifier. A backdoor target needs a far smaller mask than every other
class; the outlier test over classes (MAD anomaly index of the mask sizes) finds it.

All classes are optimised together (one batch of K x B images a step), so a step costs K x B forward
and backward passes; for many classes `classes=` restricts the search to a candidate subset, and under
torchrun each rank runs its share of the classes (engine.distributed)."""
import math
import statistics
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import distributed
from ..errors import UserError
from ..optim import descend
from ..evaluate import image_features
from . import LOGIT_SCALE


@dataclass
class TargetedConfig:
    steps: int = 100           # mask family (the scan's Neural Cleanse test); 200 was tried on dev and test and not
                               # adopted (bench/results/variants/zoo_*_steps200.md)
    batch: int = 16            # images of other classes per class and step
    lr: float = 0.1            # Adam on the mask and pattern logits
    lam: float = 0.01          # weight of sum(m) (pixels) against the CE towards k (the start, if adaptive)
    adaptive: bool = True      # Neural Cleanse's schedule: per class, raise lam while the batch reaches k, else lower it
    success: float = 1.0       # adaptive: the batch share sent to k that counts as reaching it
    lam_factor: float = 1.2    # adaptive: lam *= / /= this per step
    strengthen_steps: int = 50  # the suspected target's trigger: continue at the starting lam (the smallest mask
                                # that works is barely working; the repair needs one that does)
    recheck_top: int = 3        # the detector's mask test: the classes with the smallest masks are inverted again ...
    recheck_seeds: int = 2      # ... from this many other seeds, their sizes averaged (one run's ranking is noisy)
    mask_init: float = -3.0    # logit: m = sigmoid(-3) = 0.047 everywhere
    lr_additive: float = 0.01  # Adam on the additive perturbation
    lam_additive: float = 1.0  # weight of ||d||_2 against the CE towards k
    warp_steps: int = 100      # warp family: the scan's warp inversion
    warp_grid: int = 4         # warp family: control points per side
    warp_pixels: float = 3.0   # warp family: largest shift, px
    lr_warp: float = 0.1
    blend_alpha: float = 0.2   # blend family: the pattern's weight over the whole image (the zoo's blends: 0.1-0.25)
    bounded_eps: float = 0.1   # bounded family: the largest change of a pixel
    seed: int = 0

    def as_dict(self):
        return asdict(self)


def stamp(images, mask, pattern):
    """x' = (1 - m) x + m P with m (…, 1, S, S) and P (…, 3, S, S) broadcast over the batch."""
    return (1 - mask) * images + mask * pattern


class MaskFamily:
    """x' = (1 - m) x + m P, m = sigmoid (K, 1, 1, S, S), P = sigmoid (K, 1, 3, S, S); size = sum(m)."""
    name = "mask"

    def __init__(self, K, s, cfg, g, dev, init=None):
        if init is None:
            self.mask_logit = torch.full((K, 1, 1, s, s), cfg.mask_init, device=dev)
            self.pattern_logit = (torch.randn(K, 1, 3, s, s, generator=g) * 0.1).to(dev)
        else:  # continue from (masks (K, 1, S, S), patterns (K, 3, S, S))
            self.mask_logit, self.pattern_logit = (torch.logit(t.clamp(1e-4, 1 - 1e-4)).unsqueeze(1).to(dev) for t in init)
        self.mask_logit.requires_grad_(True)
        self.pattern_logit.requires_grad_(True)
        self.params = [self.mask_logit, self.pattern_logit]

    def apply(self, x, rows=slice(None)):
        return stamp(x, torch.sigmoid(self.mask_logit[rows]), torch.sigmoid(self.pattern_logit[rows]))

    def size(self):
        return torch.sigmoid(self.mask_logit).flatten(1).sum(1)

    def result(self):
        return torch.sigmoid(self.mask_logit).detach()[:, 0], torch.sigmoid(self.pattern_logit).detach()[:, 0]


class AdditiveFamily:
    """x' = clip(x + d), d (K, 1, 3, S, S) unconstrained; size = the L2 norm of d (per image pixel RMS x S)."""
    name = "additive"

    def __init__(self, K, s, cfg, g, dev, init=None):
        self.delta = (torch.randn(K, 1, 3, s, s, generator=g) * 1e-3).to(dev).requires_grad_(True)
        self.params = [self.delta]

    def apply(self, x, rows=slice(None)):
        return (x + self.delta[rows]).clamp(0, 1)

    def size(self):
        return self.delta.flatten(1).norm(dim=1)

    def result(self):
        return self.delta.detach()[:, 0], None


class WarpFamily:
    """x' = x resampled along identity + d, d a smooth field (K, 2, g, g) upsampled bicubically, each
    shift at most `warp_pixels` px (tanh). No size penalty: every class gets the same budget, and the
    outlier test is on how many images each class's warp flips (engine.inversion.detect). `init`: (grids,
    z) as result() gives them, to continue from z."""
    name = "warp"

    def __init__(self, K, s, cfg, g, dev, init=None):
        self.s, self.bound = s, 2 * cfg.warp_pixels / s   # grid units: [-1, 1] spans the image
        z = torch.randn(K, 2, cfg.warp_grid, cfg.warp_grid, generator=g) * 0.1 if init is None else init[1].clone()
        self.z = z.to(dev).requires_grad_(True)
        self.params = [self.z]

    def grids(self):
        field = F.interpolate(self.bound * torch.tanh(self.z), size=(self.s, self.s), mode="bicubic",
                              align_corners=True).permute(0, 2, 3, 1)
        ramp = torch.linspace(-1, 1, self.s, device=field.device)
        yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
        return (torch.stack([xx, yy], dim=-1)[None] + field).clamp(-1, 1)      # (K, S, S, 2)

    def apply(self, x, rows=slice(None)):
        K, B = x.shape[:2]
        grid = self.grids()[rows][:, None].expand(K, B, -1, -1, -1).flatten(0, 1)
        return F.grid_sample(x.flatten(0, 1), grid, mode="bilinear", padding_mode="border",
                             align_corners=True).view_as(x)

    def size(self):
        return self.z.new_zeros(len(self.z))

    def result(self):
        return self.grids().detach(), self.z.detach()


class WarpSizeFamily(WarpFamily):
    """The warp family with Neural Cleanse's size penalty and schedule (invert's adaptive lambda): size = the
    mean control-point shift in px (how the zoo's warps measure their strength), so each class gets the
    smallest warp within `warp_pixels` that sends the shots to it. A diagnostic (bench.warp_detectability)."""
    name = "warp_size"

    def size(self):
        return (self.bound * torch.tanh(self.z)).abs().mean(dim=(1, 2, 3)) * self.s / 2


def warp(images, grid):
    """Resample [0, 1] images (N, 3, S, S) along one grid (S, S, 2) from WarpFamily."""
    g = grid.to(images)[None].expand(len(images), -1, -1, -1)
    return F.grid_sample(images, g, mode="bilinear", padding_mode="border", align_corners=True)


class BlendFamily:
    """x' = (1 - a) x + a P over the whole image, a fixed (blend_alpha), P = sigmoid (K, 1, 3, S, S): a
    global blended trigger. No size penalty: every class gets the same budget a, like the warps."""
    name = "blend"

    def __init__(self, K, s, cfg, g, dev, init=None):
        self.alpha = cfg.blend_alpha
        if init is None:
            self.pattern_logit = (torch.randn(K, 1, 3, s, s, generator=g) * 0.1).to(dev)
        else:  # continue from patterns (K, 3, S, S)
            self.pattern_logit = torch.logit(init[0].clamp(1e-4, 1 - 1e-4)).unsqueeze(1).to(dev)
        self.pattern_logit.requires_grad_(True)
        self.params = [self.pattern_logit]

    def apply(self, x, rows=slice(None)):
        return (1 - self.alpha) * x + self.alpha * torch.sigmoid(self.pattern_logit[rows])

    def size(self):
        return self.pattern_logit.new_zeros(len(self.pattern_logit))

    def result(self):
        return torch.sigmoid(self.pattern_logit).detach()[:, 0], None


class BoundedFamily:
    """x' = clip(x + eps tanh(z)), z (K, 1, 3, S, S): an additive pattern over the whole image, each pixel
    at most `bounded_eps` (the zoo's periodic and blended triggers change pixels by 0.1-0.25). No size
    penalty, like the blends. `init`: patterns (K, ...) broadcastable to (3, S, S), e.g. inverted stripes."""
    name = "bounded"

    def __init__(self, K, s, cfg, g, dev, init=None):
        self.eps = cfg.bounded_eps
        if init is None:
            self.z = (torch.randn(K, 1, 3, s, s, generator=g) * 0.1).to(dev)
        else:
            self.z = torch.atanh((init[0] / self.eps).clamp(-0.999, 0.999)).unsqueeze(1).to(dev)
        self.z.requires_grad_(True)
        self.params = [self.z]

    def apply(self, x, rows=slice(None)):
        return (x + self.eps * torch.tanh(self.z[rows])).clamp(0, 1)

    def size(self):
        return self.z.new_zeros(len(self.z))

    def result(self):
        return (self.eps * torch.tanh(self.z)).detach()[:, 0], None


FAMILIES = {"mask": MaskFamily, "additive": AdditiveFamily, "warp": WarpFamily, "warp_size": WarpSizeFamily,
            "blend": BlendFamily, "bounded": BoundedFamily}
ADAPTIVE = ("mask", "warp_size")   # the families with a size penalty, hence Neural Cleanse's lambda schedule


def invert(clip, images, labels, text, cfg, classes=None, progress=False, encode=None, family="mask", init=None,
           lam=None, steps=None):
    """Per candidate class k (default every class), the family's trigger towards k: (its tensors, per-class
    sizes, the per-step mean losses). mask: (masks (K, 1, S, S), patterns (K, 3, S, S)); additive:
    (deltas (K, 3, S, S), None); warp: (grids (K, S, S, 2), control shifts z (K, 2, g, g)). Each class's
    trigger is optimised on the shots not labelled k. `init`, `lam`, `steps` continue from given triggers
    with another penalty weight / step count (refine)."""
    n_classes = text.shape[0]
    classes = list(range(n_classes)) if classes is None else list(classes)
    dev = clip.device
    images, labels = images.to(dev), labels.to(dev)
    pools = [torch.nonzero(labels != k).flatten() for k in classes]
    if any(len(p) == 0 for p in pools):
        raise UserError("trigger inversion needs shots of at least two classes")
    g = torch.Generator().manual_seed(cfg.seed)
    s, K, B = images.shape[-1], len(classes), cfg.batch
    fam = FAMILIES[family](K, s, cfg, g, dev, init)
    lam = lam if lam is not None else {"mask": cfg.lam, "additive": cfg.lam_additive}.get(family, 0.0)
    lr = {"additive": cfg.lr_additive, "warp": cfg.lr_warp, "warp_size": cfg.lr_warp}.get(family, cfg.lr)
    opt = torch.optim.Adam(fam.params, lr=lr)
    target = torch.tensor(classes, device=dev).repeat_interleave(B)
    adaptive = cfg.adaptive and family in ADAPTIVE and init is None
    lam = torch.full((K,), float(lam), device=dev)
    best, prev = None, None   # adaptive: per class, the smallest trigger that reached k (size, result tensors)
    split = distributed.active() and K >= distributed.world()   # refining one class: every rank runs it whole
    lo, hi = distributed.bounds(K) if split else (0, K)          # this rank's classes
    mine = target.view(K, B)[lo:hi].flatten()
    history = []
    bar = tqdm(range(steps or cfg.steps), desc=f"{family} inversion", file=sys.stderr, disable=not progress, mininterval=2)
    for step in bar:
        idx = torch.stack([p[torch.randint(len(p), (B,), generator=g).to(dev)] for p in pools])  # (K, B)
        x = fam.apply(images[idx[lo:hi]], rows=slice(lo, hi)).flatten(0, 1)
        logits = LOGIT_SCALE * image_features(clip, x, encode) @ text.t()
        ce = F.cross_entropy(logits, mine, reduction="none").view(hi - lo, B).mean(1)
        size = fam.size()
        if adaptive:  # the trigger before this step: does it reach k, and is it the smallest so far that does?
            with torch.no_grad():
                hits = (logits.argmax(1) == mine).view(hi - lo, B).float().mean(1)
                now = (distributed.fill_rows(hits, K, lo) if split else hits) >= cfg.success
                # a snapshot must reach k on two batches in a row: one lucky batch keeps too weak a trigger
                reached = now & (prev if step else torch.zeros_like(now))
                best = _keep_smallest(best, reached, size.detach(), fam.result())
                lam, prev = torch.where(now, lam * cfg.lam_factor, lam / cfg.lam_factor), now
        loss = (ce + lam[lo:hi] * size[lo:hi]).sum()   # each rank's classes; descend sums the ranks' gradients
        history.append(descend(loss, opt, where=f"{family} trigger inversion step {step + 1}",
                               hint="lower the inversion lr or check the model and data",
                               sharded=split) / K)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    with torch.no_grad():
        sizes, result = fam.size(), fam.result()
    if best is not None:  # classes that never reached k keep their last trigger
        sizes, result = best[0].where(torch.isfinite(best[0]), sizes), tuple(
            b.where(torch.isfinite(best[0]).view(-1, *[1] * (b.dim() - 1)), r) for b, r in zip(best[1], result))
    return result, sizes.tolist(), history


def _keep_smallest(best, reached, size, result):
    """Update (per-class best size, per-class result tensors) with the classes that reached k at a
    smaller size; sizes start at inf (never reached)."""
    if best is None:
        best = (torch.full_like(size, float("inf")), tuple(r.clone() for r in result))
    better = reached & (size < best[0])
    sel = lambda t: better.view(-1, *[1] * (t.dim() - 1))  # noqa: E731
    return best[0].where(~better, size), tuple(torch.where(sel(r), r, b) for r, b in zip(result, best[1]))


def anomaly_low(values, k):
    """How far value k lies BELOW the others, in MAD units (Neural Cleanse's anomaly index)."""
    others = [v for i, v in enumerate(values) if i != k]
    med = statistics.median(others)
    mad = 1.4826 * statistics.median(abs(v - med) for v in others)
    return (med - values[k]) / max(mad, 1e-12 + 0.01 * abs(med))


def log_outlier(sizes):
    """(index of the smallest mask, its anomaly index on log sizes)."""
    logs = [math.log(max(v, 1e-6)) for v in sizes]
    k = min(range(len(logs)), key=logs.__getitem__)
    return k, anomaly_low(logs, k)


def refine(clip, images, labels, text, k, mask, pattern, cfg, lam_factor=4.0, steps=100, progress=False):
    """Continue class k's inverted trigger alone with `lam_factor` times the starting mask penalty: above 1
    it tightens the mask (closer to a true trigger's size), at 1 it strengthens a barely working one."""
    (m, p), sizes, _ = invert(clip, images, labels, text, cfg, classes=[k], init=(mask[None], pattern[None]),
                              lam=cfg.lam * lam_factor, steps=steps, progress=progress)
    return m[0], p[0], sizes[0]


def log_gap(sizes, k):
    """How many e-folds class k's mask is smaller than the other classes' median mask: a scale-free size
    ratio that, unlike the anomaly index, does not shrink when the other classes spread widely."""
    others = [v for i, v in enumerate(sizes) if i != k]
    return math.log(max(statistics.median(others), 1e-6)) - math.log(max(sizes[k], 1e-6))
