"""Targeted inversion of additive stripe triggers, the family SIG's sinusoid belongs to.

CBPT's mask inversion (engine.defenses.cbpt) looks for a small stamped region; a full-image additive
signal such as SIG (x + 0.235 sin(2 pi 6 j / W), every pixel) needs more mask than the model's own
natural patches and is never found that way. This searches the global signals directly, but only a narrow
family of them, so that a clean model cannot just be fooled by an adversarial perturbation: for every
class k and each orientation, one 1-D pattern (the same value down each column, or along each row;
same in all channels), |delta| <= eps, is added to the images and optimised so that the few clean shots
are classified as k. A backdoor keyed to a stripe signal makes its target class far easier to reach than
any other; engine.scan measures the held-out share each pattern sends to its class.
"""
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import distributed
from ..optim import check_finite
from ..evaluate import image_features

# vertical: the value varies along the width (SIG's stripes); horizontal: along the height; diagonal:
# constant along each anti-diagonal (a function of row + column); antidiagonal: of row - column
ORIENTATIONS = ("vertical", "horizontal", "diagonal", "antidiagonal")
from . import LOGIT_SCALE


@dataclass
class StripeConfig:
    eps: float = 0.1       # max |delta|; SIG's own amplitude is 0.235, the zoo's periodic triggers 0.1-0.25
    steps: int = 50        # 4 orientations x K classes x batch images a step: the detector's costliest part
    lr: float = 0.1
    batch: int = 8         # shots per step, shared by every (orientation, class) candidate
    chunk: int = 512       # images per forward/backward; gradients accumulate over chunks
    seed: int = 0

    def as_dict(self):
        return asdict(self)


def stripe_patterns(z, eps):
    """(4, K, 2S - 1) free parameters -> {orientation: (K, 1, S, S)-broadcastable additive patterns}
    (vertical and horizontal use the first S values of their row)."""
    d = eps * torch.tanh(z)
    k, s = d.shape[1], (d.shape[2] + 1) // 2
    i = torch.arange(s, device=z.device)
    diag = (i[:, None] + i[None, :]).flatten()
    anti = (i[:, None] - i[None, :] + s - 1).flatten()
    return {"vertical": d[0, :, :s].view(k, 1, 1, s), "horizontal": d[1, :, :s].view(k, 1, s, 1),
            "diagonal": d[2][:, diag].view(k, 1, s, s), "antidiagonal": d[3][:, anti].view(k, 1, s, s)}


def add_pattern(images, pattern):
    return (images + pattern.to(images)).clamp(0, 1)


def invert_stripes(clip, images, text, cfg, progress=False):
    """Optimise one pattern per (orientation, class) on [0, 1] shots (N, 3, S, S) against the classifier
    `text` (K, E). Returns ({orientation: (K, 1, S|1, S|1) patterns}, per-step losses)."""
    g = torch.Generator().manual_seed(cfg.seed)
    k, s = text.shape[0], images.shape[-1]
    z = (torch.randn(len(ORIENTATIONS), k, 2 * s - 1, generator=g) * 0.1).to(clip.device).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.lr)
    images, text = images.to(clip.device), text.to(clip.device)
    candidates = [(o, c) for o in ORIENTATIONS for c in range(k)]
    split = distributed.active() and len(candidates) >= distributed.world()
    lo, hi = distributed.bounds(len(candidates)) if split else (0, len(candidates))   # this rank's candidates
    per_chunk = max(1, cfg.chunk // cfg.batch)
    history = []
    bar = tqdm(range(cfg.steps), desc="stripe inversion", file=sys.stderr, disable=not progress, mininterval=2)
    for step in bar:
        x = images[torch.randperm(len(images), generator=g)[:cfg.batch].to(clip.device)]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(lo, hi, per_chunk):     # gradients accumulate over the chunks
            part = candidates[i:min(i + per_chunk, hi)]
            patterns = stripe_patterns(z, cfg.eps)
            xs = torch.cat([add_pattern(x, patterns[o][c]) for o, c in part])
            target = torch.tensor([c for _, c in part], device=clip.device).repeat_interleave(len(x))
            logits = LOGIT_SCALE * image_features(clip, xs) @ text.t()
            loss = F.cross_entropy(logits, target, reduction="sum") / (len(x) * len(candidates))
            check_finite(loss, where=f"stripe inversion step {step + 1}",
                         hint=f"lower the stripe lr (now {cfg.lr}) or check the model and data")
            loss.backward()
            total += loss.item()
        if split:   # each candidate's gradient came from one rank: the sum is the whole step's
            distributed.sum_gradients([z])
            total = distributed.sum_value(total)
        opt.step()
        history.append(total)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    return {o: p.detach() for o, p in stripe_patterns(z, cfg.eps).items()}, history
