"""CleanCLIP baseline (docs/ALGORITHMS.md, "Baselines"): fine-tune the WHOLE CLIP on clean image-caption pairs with
the multimodal InfoNCE plus in-modal InfoNCE (two augmented views of each image; two caption templates
of each class), which weakens the spurious trigger-target link. The defender's pairs are the few shots
with captions made from class templates. Unlike the prompt defenses every parameter changes, so the run
keeps a whole model."""
import copy
import math
from dataclasses import asdict, dataclass, replace

import torch

from ..augment import augment
from ..lab import contrastive_loss
from ..tokenizer import CLASS_TEMPLATES
from . import minibatch_epochs

TEMPLATES = [t.replace("{c}", "{}") for t in CLASS_TEMPLATES]  # plain English: fits any CLIP tokenizer


@dataclass
class CleanCLIPConfig:
    lr: float = 1e-5            # real CLIP (CleanCLIP's fine-tuning rate)
    weight_decay: float = 0.1
    epochs: int = 20
    batch: int = 32
    in_modal: float = 1.0       # weight of the image-image + text-text InfoNCE terms
    seed: int = 0

    def as_dict(self):
        return asdict(self)


# The lab CLIP was pre-trained at 1e-3 for minutes, not weeks; 1e-5 barely moves it in 100 steps.
LAB_DEFAULTS = dict(lr=1e-4)


def default_config(model_name, **overrides):
    base = dict(LAB_DEFAULTS) if model_name.startswith("lab-") else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return CleanCLIPConfig(**base)


def _captions(clip, labels, classes, rng):
    """Tokens of one random template per image, and the per-image class ids (identical captions and
    same-class captions are positives of each other)."""
    texts = [TEMPLATES[rng.integers(len(TEMPLATES))].format(classes[y]) for y in labels.tolist()]
    return clip.tokenizer(texts).to(clip.device)


def tune(clip, train, cfg, progress=True):
    """Returns (a fine-tuned copy of `clip`, per-epoch mean losses); `clip` itself is not modified."""
    import numpy as np
    torch.manual_seed(cfg.seed)
    g, rng = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
    model = copy.deepcopy(clip.model).train().requires_grad_(True)
    tuned = replace(clip, model=model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train)
    steps = cfg.epochs * math.ceil(n / cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    images, labels = train.images.to(clip.device), train.labels.to(clip.device)

    def loss_of(b):
        y = labels[b]
        view_a, view_b = (model.encode_image(tuned.normalise(augment(images[b], g))) for _ in range(2))
        text_a = model.encode_text(_captions(tuned, y, train.classes, rng))
        text_b = model.encode_text(_captions(tuned, y, train.classes, rng))
        same_class, same_image = y[:, None], torch.arange(len(b), device=y.device)[:, None]
        scale = model.logit_scale.exp()
        return contrastive_loss(view_a, text_a, same_class, scale) + cfg.in_modal * (
            contrastive_loss(view_a, view_b, same_image, scale) + contrastive_loss(text_a, text_b, same_class, scale))

    history = minibatch_epochs(n, cfg.batch, cfg.epochs, g, loss_of, opt, sched, desc="cleanclip",
                               hint=f"lower --lr (now {cfg.lr})", progress=progress, device=clip.device)
    model.eval().requires_grad_(False)
    return tuned, history
