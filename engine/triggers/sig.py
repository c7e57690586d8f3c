"""SIG: a horizontal sinusoid added along the columns, x' = clip(x + delta * sin(2 pi f j / S))."""
import math

import torch


class SIG:
    def __init__(self, size, seed=0, delta=60 / 255, frequency=6):
        j = torch.arange(size, dtype=torch.float32)
        self.signal = delta * torch.sin(2 * math.pi * frequency * j / size).view(1, 1, 1, size)

    def __call__(self, images):
        return (images + self.signal.to(images)).clamp(0, 1)
