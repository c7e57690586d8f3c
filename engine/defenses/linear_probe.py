"""Linear probe baseline (docs/ALGORITHMS.md, "Baselines"): a (K, E) linear classifier on the frozen image tower's
normalised features, trained with SGD on the few shots. It replaces the text classifier, so it folds
into the exported model like CBPT's class features: logits = logit_scale * z @ W.t().

No bias: the few-shot set is class-balanced, and without one the probe is a drop-in classifier matrix."""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..evaluate import features
from . import minibatch_epochs


@dataclass
class LinearProbeConfig:
    lr: float = 0.01            # docs/ALGORITHMS.md: SGD lr 0.01, momentum 0.9, batch 32, 40 epochs
    momentum: float = 0.9
    batch: int = 32
    epochs: int = 40
    seed: int = 0

    def as_dict(self):
        return asdict(self)


def default_config(**overrides):
    return LinearProbeConfig(**{k: v for k, v in overrides.items() if v is not None})


def tune(clip, train, cfg, encode=None, progress=True):
    """Returns (W (K, E), per-epoch mean losses). Features are computed once (frozen encoder). The
    logits carry CLIP's logit scale so SGD at lr 0.01 moves W at the scale of the text features."""
    g = torch.Generator().manual_seed(cfg.seed)
    feats = features(clip, train.images, encode, batch=256)
    labels = train.labels.to(clip.device)
    weight = torch.zeros(len(train.classes), feats.shape[1], device=clip.device, requires_grad=True)
    opt = torch.optim.SGD([weight], lr=cfg.lr, momentum=cfg.momentum)

    def loss_of(b):
        return F.cross_entropy(clip.logit_scale * feats[b] @ weight.t(), labels[b])

    history = minibatch_epochs(len(train), cfg.batch, cfg.epochs, g, loss_of, opt, desc="linear probe",
                               hint=f"lower --lr (now {cfg.lr})", progress=progress, device=clip.device)
    return weight.detach(), history
