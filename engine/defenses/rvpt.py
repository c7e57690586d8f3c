"""RVPT (docs/ALGORITHMS.md, "RVPT"): deep visual prompts tuned with cross-entropy + alpha * feature repelling.

The repelling term pushes the prompted class token c^d away from the frozen model's class token sigma^d
at every prompted depth; with alpha = 0 this is plain deep VPT (the ablation)."""
import math
from dataclasses import asdict, dataclass

import torch

from kernels.reference import repel_ce_loss_reference as rvpt_loss  # L_CE + alpha * L_FR, torch only

from .. import distributed, prompted_vit
from ..augment import augment
from . import minibatch_epochs


@dataclass
class RVPTConfig:
    start: int = 3             # D: blocks 1..D stay unprompted
    tokens: int = 50           # b: prompt tokens per prompted block
    init_std: float = 0.02
    alpha: float = 2.0         # weight of the feature-repelling loss
    margin: float = None       # optional per-sample floor m of the repelling term
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 50
    batch: int = 32
    seed: int = 0
    augment: bool = True       # flips, small shifts, colour-channel permutations of the few shots

    def as_dict(self):
        return asdict(self)


# The lab ViT (6 blocks, 16 patch tokens + the class token) is prompted from the first block on (D=0) with
# b=16 tokens, about as many prompt tokens as image tokens, like ViT-B-32's b=50 for its 50 tokens; lr and
# epochs were chosen on the BadNet lab model. What these defaults give on every bundled lab model:
# bench/results/defense_matrix.json (the "rvpt" cells).
LAB_DEFAULTS = dict(start=0, tokens=16, lr=0.1, epochs=60)


def default_config(model_name, **overrides):
    """The paper's defaults (docs/ALGORITHMS.md, "RVPT") for real CLIP, LAB_DEFAULTS for lab models;
    `overrides` that are None are ignored."""
    base = dict(LAB_DEFAULTS) if model_name.startswith("lab-") else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return RVPTConfig(**base)


def _loss_fn(backend):
    if backend == "triton":
        from kernels.repel_loss import repel_ce_loss
        return repel_ce_loss
    return rvpt_loss


def rvpt_step_loss(clip, prompts, images, labels, text, cfg, backend):
    """Loss of one batch of [0, 1] images: prompted + frozen forward, then CE + alpha * FR."""
    out = prompted_vit.forward(clip.visual, prompts, clip.normalise(images), backend, with_frozen=cfg.alpha != 0)
    frozen = out["frozen_cls"] if cfg.alpha != 0 else out["cls"].detach()
    return _loss_fn(backend)(out["cls"], frozen, out["feature"], text, clip.logit_scale, labels,
                             cfg.alpha, cfg.margin)


def tune(clip, train, text, cfg, backend="shared", progress=True):
    """Tune fresh prompts on the few-shot ImageSet `train`; returns (prompts, per-epoch mean losses)."""
    torch.manual_seed(cfg.seed)
    prompts = prompted_vit.VisualPrompts.for_visual(clip.visual, cfg.start, cfg.tokens, cfg.init_std).to(clip.device)
    opt = torch.optim.SGD(prompts.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    images, labels = train.images.to(clip.device), train.labels.to(clip.device)
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_of(b):
        x = augment(images[b], g) if cfg.augment else images[b]   # the whole batch on every rank: same draws
        x, y, weight = distributed.shard(x, labels[b])
        return weight * rvpt_step_loss(clip, prompts, x, y, text, cfg, backend)

    history = minibatch_epochs(n, cfg.batch, cfg.epochs, g, loss_of, opt, sched, desc="rvpt",
                               hint=f"lower --lr (now {cfg.lr}) or check the model and data",
                               progress=progress, device=clip.device, sharded=distributed.active())
    return prompts.requires_grad_(False), history
