"""BadNet: a small noise patch, drawn ONCE from the seed (the public code re-draws it per image, a
known bug), stamped at a fixed corner. 16 px at 224, scaled with the image size (3 px at 32)."""
import torch


def patch_size(size):
    """16 px at 224 (docs/ALGORITHMS.md, "Triggers"), scaled with the image size; 3 px at the least."""
    return max(3, round(16 * size / 224))


def stamp(images, pattern, y, x):
    """A copy of `images` with `pattern` (3, p, p) pasted at row y, column x."""
    out = images.clone()
    p = pattern.shape[-1]
    out[:, :, y:y + p, x:x + p] = pattern.to(images)
    return out


class BadNet:
    def __init__(self, size, seed=0, patch=None, corner="bottom-right"):
        self.patch = patch or patch_size(size)
        g = torch.Generator().manual_seed(seed)
        self.pattern = torch.rand(3, self.patch, self.patch, generator=g)
        off = size - self.patch
        self.y, self.x = {"bottom-right": (off, off), "top-left": (0, 0), "centre": (off // 2, off // 2)}[corner]

    def __call__(self, images):
        return stamp(images, self.pattern, self.y, self.x)
