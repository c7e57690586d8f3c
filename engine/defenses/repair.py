"""Repair: invert the trigger on the few shots, then tune deep visual prompts so that the prompted encoder
maps dummy-triggered shots where the frozen encoder maps the clean ones, while clean features are
distilled from the frozen model. No labels are used by the prompt tuning (only by the inversion's
choice of target classes), so unlabelled clean images could be added.

    loss = w_clean (1 - cos(p(x), f(x))) + w_trigger (1 - cos(p(T(x)), f(x)))

p = prompted encoder, f = the frozen one, T = the inverted trigger of the family that flagged
(engine.inversion.detect: a stamped mask + pattern, or stripes). When the detector reads the model clean,
nothing is tuned unless `always` (then T is the mask inversion's trigger): a clean model costs nothing."""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .. import prompted_vit
from ..augment import augment
from ..inversion import detect as det
from . import minibatch_epochs


@dataclass
class RepairConfig:
    detect: det.DetectConfig = field(default_factory=det.DetectConfig)
    always: bool = False         # repair even when the detector reads the model clean
    start: int = 0               # D: unprompted leading blocks
    tokens: int = 16             # b: prompt tokens per block
    init_std: float = 0.02
    w_clean: float = 10.0
    w_trigger: float = 10.0
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 30
    batch: int = 32
    seed: int = 0
    augment: bool = True

    def as_dict(self):
        return asdict(self)


def distill_loss(prompted, frozen):
    return (1 - F.cosine_similarity(prompted, frozen, dim=-1)).mean()


def tune_prompts(clip, images, trigger, cfg, backend="shared", progress=True):
    """Deep visual prompts distilled from the frozen encoder on clean and T-triggered images."""
    torch.manual_seed(cfg.seed)
    prompts = prompted_vit.VisualPrompts.for_visual(clip.visual, cfg.start, cfg.tokens, cfg.init_std).to(clip.device)
    opt = torch.optim.SGD(prompts.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    n = len(images)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * math.ceil(n / cfg.batch))
    images = images.to(clip.device)
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_of(b):
        x = augment(images[b], g) if cfg.augment else images[b]
        both = clip.normalise(torch.cat([x, trigger(x)]))
        with torch.no_grad():
            target = clip.model.encode_image(both[:len(x)])
        z = prompted_vit.forward(clip.visual, prompts, both, backend)["feature"]
        return cfg.w_clean * distill_loss(z[:len(x)], target) + cfg.w_trigger * distill_loss(z[len(x):], target)

    history = minibatch_epochs(n, cfg.batch, cfg.epochs, g, loss_of, opt, sched, desc="repair prompts",
                               hint=f"lower the repair lr (now {cfg.lr})", progress=progress, device=clip.device)
    return prompts.requires_grad_(False), history


def tune(clip, train, text, cfg, backend="shared", progress=True, log=None):
    """Returns {'prompts' (None if nothing was tuned), 'detection' (engine.inversion.detect's), 'history'}."""
    found = det.detect(clip, train, text, cfg.detect, progress=progress, log=log)
    if found["verdict"] == "clean" and not cfg.always:
        return {"prompts": None, "detection": found, "history": []}
    prompts, history = tune_prompts(clip, train.images, found["trigger"], cfg, backend, progress)
    return {"prompts": prompts, "detection": found, "history": history}
