"""WaNet: a fixed smooth warp, x' = grid_sample(x, identity + s * upsample(noise_k) / S).

noise_k is a k x k x 2 field in [-1, 1] (normalised by its mean magnitude, as the public code does),
drawn from the seed and upsampled bicubically to S x S."""
import torch
import torch.nn.functional as F


class WaNet:
    def __init__(self, size, seed=0, k=4, s=1.0):
        g = torch.Generator().manual_seed(seed)
        noise = torch.rand(1, 2, k, k, generator=g) * 2 - 1
        noise = noise / noise.abs().mean()
        field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ramp = torch.linspace(-1, 1, size)
        yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
        identity = torch.stack([xx, yy], dim=-1).unsqueeze(0)
        self.grid = (identity + s * field / size).clamp(-1, 1)

    def __call__(self, images):
        grid = self.grid.to(images).expand(images.shape[0], -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
