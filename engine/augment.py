"""Cheap batch augmentation for few-shot tuning on [0, 1] images: 16 images per class are easy to
overfit, so each epoch sees them flipped, shifted by a few pixels and with their colour channels permuted."""
import torch
import torch.nn.functional as F


def augment(images, generator, max_shift=None):
    n, _, h, w = images.shape
    max_shift = max(1, h // 16) if max_shift is None else max_shift
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flip.view(n, 1, 1, 1).to(images.device), images.flip(-1), images)
    # shift: replicate-pad, then crop at a random offset per image
    padded = F.pad(out, (max_shift,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)).tolist()
    out = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    perm = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)]).to(images.device)
    return out.gather(1, perm.view(n, 3, 1, 1).expand(-1, -1, h, w))
