"""CBPT's trigger inversion (docs/ALGORITHMS.md, "CBPT", step 1): one stamped mask + pattern, untargeted,
optimised so that triggered images of different classes cluster together and away from their clean
embeddings (InfoNCE with triggered anchors) plus lambda * mean(mask). Used by engine.defenses.cbpt; the
targeted per-class inversion the detector uses is targeted.py."""
import sys

import torch
from tqdm import tqdm

from ..errors import UserError
from ..evaluate import image_features
from ..optim import descend
from .targeted import stamp


def inversion_loss(triggered, clean, tau=0.07):
    """InfoNCE with triggered anchors: positives = the OTHER triggered embeddings, negatives = all clean
    embeddings (the anchor's own clean version included). Inputs are normalised (B, E)."""
    b = triggered.shape[0]
    if b < 2:
        raise UserError("trigger inversion needs at least 2 images per batch")
    s_pos = triggered @ triggered.t() / tau                       # (B, B)
    s_neg = triggered @ clean.t() / tau                           # (B, B)
    eye = torch.eye(b, dtype=torch.bool, device=triggered.device)
    s_pos = s_pos.masked_fill(eye, float("-inf"))
    denom = torch.logsumexp(torch.cat([s_pos, s_neg], dim=1), dim=1, keepdim=True)
    log_prob = (s_pos - denom).masked_fill(eye, 0.0)
    return -(log_prob.sum(1) / (b - 1)).mean()


def invert_trigger(clip, images, cfg, progress=False, encode=None):
    """Optimise (mask, pattern) on [0, 1] images (N, 3, S, S). Returns (mask (1,1,S,S), pattern
    (1,3,S,S), per-step losses)."""
    g = torch.Generator().manual_seed(cfg.seed)
    s = images.shape[-1]
    dev = clip.device
    mask_logit = torch.full((1, 1, s, s), cfg.mask_init, device=dev).requires_grad_(True)
    pattern_logit = (torch.randn(1, 3, s, s, generator=g) * 0.1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=cfg.inv_lr)
    images = images.to(dev)
    n = len(images)
    history = []
    bar = tqdm(range(cfg.inv_steps), desc="cbpt inversion", file=sys.stderr, disable=not progress, mininterval=2)
    for step in bar:
        idx = torch.randperm(n, generator=g)[:cfg.inv_batch].to(dev)
        x = images[idx]
        with torch.no_grad():
            clean = image_features(clip, x, encode)
        m, p = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        trig = image_features(clip, stamp(x, m, p), encode)
        loss = inversion_loss(trig, clean, cfg.tau) + cfg.lam * m.mean()
        history.append(descend(loss, opt, where=f"trigger inversion step {step + 1}",
                               hint=f"lower inv_lr (now {cfg.inv_lr}) or check the model and data"))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    return torch.sigmoid(mask_logit).detach(), torch.sigmoid(pattern_logit).detach(), history
