"""WaNet: a fixed smooth warp, x' = grid_sample(x, identity + s * upsample(noise_k) / S).

noise_k is a k x k x 2 field in [-1, 1] (normalised by its mean magnitude, as the public code does),
drawn from the seed and upsampled bicubically to S x S."""
import torch.nn.functional as F

from .spec import smooth_grid


class WaNet:
    def __init__(self, size, seed=0, k=4, s=1.0):
        self.grid = smooth_grid(k, s / size, size, seed)

    def __call__(self, images):
        grid = self.grid.to(images).expand(images.shape[0], -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
