"""Perturbation resistivity (PR; docs/ALGORITHMS.md, "Perturbation resistivity"; the RVPT paper's premise):
per layer, the mean cosine between the class tokens of x and of a perturbed x. The paper reports that backdoored CLIPs keep their class tokens
unusually still under perturbations; a purified model should move them more, the trigger above all.

    resistivity(clip, images, perturbations(trigger), prompts=None) -> {perturbation: [cos per layer]}
"""
import torch
import torch.nn.functional as F

from . import prompted_vit


def perturbations(trigger=None, seed=0):
    """The PR perturbations of [0, 1] images: Gaussian noise, blur, colour jitter, flip (and a trigger)."""
    def noise(x):
        g = torch.Generator().manual_seed(seed)
        return (x + 0.05 * torch.randn(x.shape, generator=g).to(x)).clamp(0, 1)

    def blur(x):
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)

    def jitter(x):
        return (1.2 * (x - 0.5) + 0.55).clamp(0, 1)     # contrast up, brightness up

    out = {"noise": noise, "blur": blur, "colour jitter": jitter, "flip": lambda x: x.flip(-1)}
    if trigger is not None:
        out["trigger"] = trigger
    return out


@torch.no_grad()
def class_tokens(clip, images, prompts=None):
    """Class token after every block, (B, L, W) (prompted: the blocks from D on, (B, L - D, W))."""
    x = clip.normalise(images.to(clip.device))
    if prompts is not None:
        return prompted_vit.forward(clip.visual, prompts, x, "shared")["cls"]
    h = clip.visual._embeds(x)
    out = []
    for blk in clip.visual.transformer.resblocks:
        h = blk(h)
        out.append(h[:, 0])
    return torch.stack(out, 1)


def resistivity(clip, images, perturbs, prompts=None, batch=500):
    """{name: per-layer mean cosine between class tokens of x and perturb(x)}."""
    sums = {name: None for name in perturbs}
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(clip.device)
        ref = class_tokens(clip, x, prompts)
        for name, fn in perturbs.items():
            cos = F.cosine_similarity(ref, class_tokens(clip, fn(x), prompts), dim=-1).sum(0)
            sums[name] = cos if sums[name] is None else sums[name] + cos
    return {name: (s / len(images)).tolist() for name, s in sums.items()}
