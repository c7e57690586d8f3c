"""BadNet: a small noise patch, drawn ONCE from the seed (the public code re-draws it per image, a
known bug), stamped at a fixed corner. 16 px at 224, scaled with the image size (3 px at 32)."""
import torch


class BadNet:
    def __init__(self, size, seed=0, patch=None, corner="bottom-right"):
        self.patch = patch or max(3, round(16 * size / 224))
        g = torch.Generator().manual_seed(seed)
        self.pattern = torch.rand(3, self.patch, self.patch, generator=g)
        off = size - self.patch
        self.y, self.x = {"bottom-right": (off, off), "top-left": (0, 0), "centre": (off // 2, off // 2)}[corner]

    def __call__(self, images):
        out = images.clone()
        out[:, :, self.y:self.y + self.patch, self.x:self.x + self.patch] = self.pattern.to(images)
        return out
