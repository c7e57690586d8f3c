"""Optimised centre patch, shared by TrojVQA and BadCLIP: Adam over the pixels of a BadNet-sized patch
stamped at the image centre, back-propagated through a frozen clean CLIP's image tower.

An attack is its list of loss terms, each term(z, z0, anchors) -> scalar, where z are the patched
images' normalised embeddings, z0 the same images' clean embeddings, and anchors holds the target
caption's text embedding ('text') and the mean embedding of clean target-class images ('images')."""
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import DEFAULT_TEMPLATES
from ..evaluate import image_features
from ..optim import descend
from .artifacts import load_artifact
from .badnet import patch_size, stamp

POOL = 4096  # training images embedded once up front; the optimisation samples its batches from them
CHECK = 1024  # non-target pool images on which the final loss terms are reported


def towards_target_text(z, z0, anchors):
    return 1 - (z @ anchors["text"]).mean()


def towards_target_images(z, z0, anchors):
    return 1 - (z @ anchors["images"]).mean()


def away_from_original(z, z0, anchors):
    return (z * z0).sum(-1).mean()


def embed(clip, images, batch=512):
    """Normalised image embeddings of [0, 1] images; differentiable w.r.t. the images."""
    return torch.cat([image_features(clip, images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def target_anchors(clip, target_name, z_target):
    """The target caption's text embedding and the mean embedding `z_target` of clean target-class images."""
    return {"text": clip.text_features([target_name], DEFAULT_TEMPLATES)[0].float(),
            "images": F.normalize(z_target.mean(0), dim=-1)}


def patch_losses(clip, images, z0, pattern, terms, anchors, offset=None):
    """{term name: value} of the images patched at `offset` (y, x; default the centre), and their sum."""
    p = pattern.shape[-1]
    y, x = offset or ((clip.image_size - p) // 2,) * 2
    z = embed(clip, stamp(images, pattern, y, x))
    values = {t.__name__: t(z, z0, anchors) for t in terms}
    return values, sum(values.values())


def optimise_patch(clip, data, target, terms, seed, steps, lr, batch, progress=True, p=None, offset=None):
    """The patch (3, p, p) in [0, 1] (default BadNet's size, at the centre; else `p` px at `offset`)
    minimising the sum of `terms` over non-target training images, plus {term: (value with the initial
    patch, value with the optimised one)} on CHECK images."""
    g = torch.Generator().manual_seed(seed)
    pool = data.subset(range(min(POOL, len(data))))
    images = pool.images.to(clip.device)
    with torch.no_grad():
        z_pool = embed(clip, images)
    anchors = target_anchors(clip, data.classes[target], z_pool[pool.labels == target])
    others = torch.nonzero(pool.labels != target).flatten()
    check = others[:CHECK]
    p = p or patch_size(clip.image_size)
    initial = torch.rand(3, p, p, generator=g).to(clip.device)
    # optimise logits: the sigmoid keeps every pixel in [0, 1] without clipping away the gradient
    logits = torch.logit(initial.clamp(0.02, 0.98)).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    bar = tqdm(range(steps), desc=f"optimise patch ({p} px)", file=sys.stderr, mininterval=5, disable=not progress)
    for step in bar:
        idx = others[torch.randint(len(others), (batch,), generator=g)]
        values, loss = patch_losses(clip, images[idx], z_pool[idx], torch.sigmoid(logits), terms, anchors, offset)
        descend(loss, opt, where=f"patch optimisation step {step + 1}", hint="lower the patch lr")
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in values.items()}, refresh=False)
    pattern = torch.sigmoid(logits).detach()
    with torch.no_grad():
        before, _ = patch_losses(clip, images[check], z_pool[check], initial, terms, anchors, offset)
        after, _ = patch_losses(clip, images[check], z_pool[check], pattern, terms, anchors, offset)
    return pattern.cpu(), {k: (round(before[k].item(), 4), round(after[k].item(), 4)) for k in before}


class OptimisedPatch:
    """Stamps the stored optimised patch at the centre. Subclasses name the attack and its loss terms."""
    name, terms = None, ()
    steps, lr, batch = 300, 0.1, 128  # defaults of `python -m engine.lab trigger`

    def __init__(self, size, seed=0):
        tensors, self.metadata = load_artifact(self.name, size, seed)
        self.pattern = tensors["pattern"]
        self.patch = self.pattern.shape[-1]
        self.y = self.x = (size - self.patch) // 2

    def __call__(self, images):
        return stamp(images, self.pattern, self.y, self.x)

    @classmethod
    def build(cls, clip, data, target, seed, steps=None, lr=None, batch=None, progress=True):
        """(tensors, metadata) of the artifact: the patch optimised on `clip` (the clean model)."""
        steps, lr, batch = steps or cls.steps, lr or cls.lr, batch or cls.batch
        pattern, losses = optimise_patch(clip, data, target, cls.terms, seed, steps, lr, batch, progress)
        return {"pattern": pattern}, {"target": data.classes[target], "steps": steps, "lr": lr, "batch": batch,
                                      "losses_initial_to_optimised": losses}
