"""Targeted trigger inversion in the style of Neural Cleanse: for every class k, the smallest stamped
mask m_k with pattern P_k, x' = (1 - m) x + m P, that sends the few shots of the other classes to k
under the model's zero-shot classifier. A backdoor target needs a far smaller mask than every other
class; the outlier test over classes (MAD anomaly index of the mask sizes) finds it.

All classes are optimised together (one batch of K x B images a step), so a step costs K x B forward
and backward passes; for many classes `classes=` restricts the search to a candidate subset."""
import math
import statistics
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..evaluate import image_features
from . import LOGIT_SCALE


@dataclass
class TargetedConfig:
    steps: int = 100
    batch: int = 16            # images of other classes per class and step
    lr: float = 0.1            # Adam on the mask and pattern logits
    lam: float = 0.01          # weight of sum(m) (pixels) against the CE towards k
    mask_init: float = -3.0    # logit: m = sigmoid(-3) = 0.047 everywhere
    lr_additive: float = 0.01  # Adam on the additive perturbation
    lam_additive: float = 1.0  # weight of ||d||_2 against the CE towards k
    seed: int = 0

    def as_dict(self):
        return asdict(self)


def stamp(images, mask, pattern):
    """x' = (1 - m) x + m P with m (…, 1, S, S) and P (…, 3, S, S) broadcast over the batch."""
    return (1 - mask) * images + mask * pattern


class MaskFamily:
    """x' = (1 - m) x + m P, m = sigmoid (K, 1, 1, S, S), P = sigmoid (K, 1, 3, S, S); size = sum(m)."""
    name = "mask"

    def __init__(self, K, s, cfg, g, dev):
        self.mask_logit = torch.full((K, 1, 1, s, s), cfg.mask_init, device=dev).requires_grad_(True)
        self.pattern_logit = (torch.randn(K, 1, 3, s, s, generator=g) * 0.1).to(dev).requires_grad_(True)
        self.params = [self.mask_logit, self.pattern_logit]

    def apply(self, x):
        return stamp(x, torch.sigmoid(self.mask_logit), torch.sigmoid(self.pattern_logit))

    def size(self):
        return torch.sigmoid(self.mask_logit).flatten(1).sum(1)

    def result(self):
        return torch.sigmoid(self.mask_logit).detach()[:, 0], torch.sigmoid(self.pattern_logit).detach()[:, 0]


class AdditiveFamily:
    """x' = clip(x + d), d (K, 1, 3, S, S) unconstrained; size = the L2 norm of d (per image pixel RMS x S)."""
    name = "additive"

    def __init__(self, K, s, cfg, g, dev):
        self.delta = (torch.randn(K, 1, 3, s, s, generator=g) * 1e-3).to(dev).requires_grad_(True)
        self.params = [self.delta]

    def apply(self, x):
        return (x + self.delta).clamp(0, 1)

    def size(self):
        return self.delta.flatten(1).norm(dim=1)

    def result(self):
        return self.delta.detach()[:, 0], None


FAMILIES = {"mask": MaskFamily, "additive": AdditiveFamily}


def invert(clip, images, labels, text, cfg, classes=None, progress=False, encode=None, family="mask"):
    """Per candidate class k (default every class), the family's trigger towards k: (its tensors, per-class
    sizes, the per-step mean losses). mask: (masks (K, 1, S, S), patterns (K, 3, S, S)); additive:
    (deltas (K, 3, S, S), None). Each class's trigger is optimised on the shots not labelled k."""
    n_classes = text.shape[0]
    classes = list(range(n_classes)) if classes is None else list(classes)
    dev = clip.device
    images, labels = images.to(dev), labels.to(dev)
    pools = [torch.nonzero(labels != k).flatten() for k in classes]
    if any(len(p) == 0 for p in pools):
        raise UserError("trigger inversion needs shots of at least two classes")
    g = torch.Generator().manual_seed(cfg.seed)
    s, K, B = images.shape[-1], len(classes), cfg.batch
    fam = FAMILIES[family](K, s, cfg, g, dev)
    lam = cfg.lam if family == "mask" else cfg.lam_additive
    opt = torch.optim.Adam(fam.params, lr=cfg.lr if family == "mask" else cfg.lr_additive)
    target = torch.tensor(classes, device=dev).repeat_interleave(B)
    history = []
    bar = tqdm(range(cfg.steps), desc=f"{family} inversion", file=sys.stderr, disable=not progress, mininterval=2)
    for step in bar:
        idx = torch.stack([p[torch.randint(len(p), (B,), generator=g).to(dev)] for p in pools])  # (K, B)
        x = fam.apply(images[idx]).flatten(0, 1)
        logits = LOGIT_SCALE * image_features(clip, x, encode) @ text.t()
        ce = F.cross_entropy(logits, target, reduction="none").view(K, B).mean(1)
        loss = (ce + lam * fam.size()).sum()
        if not torch.isfinite(loss):
            raise UserError(f"trigger inversion loss became {loss.item()} at step {step + 1}; lower its lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item() / K)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    with torch.no_grad():
        sizes = fam.size().tolist()
    return fam.result(), sizes, history


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
