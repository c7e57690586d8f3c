"""Blended: x' = 0.8 x + 0.2 n, with n one fixed uniform-noise image drawn from the seed."""
import torch


class Blended:
    def __init__(self, size, seed=0, ratio=0.2):
        self.ratio = ratio
        self.noise = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))

    def __call__(self, images):
        return (1 - self.ratio) * images + self.ratio * self.noise.to(images)
