"""SSBA / ISSBA-style trigger (Li et al. 2021): a sample-specific, invisible residual that a
steganographic encoder adds to each image to hide one fixed secret bit string (drawn from the seed).

No pretrained StegaStamp encoder is available here, so this is a SMALL ENCODER TRAINED BY THE PROJECT
(`python -m engine.lab trigger --attack ssba`, a minute or two on CPU): a 3-layer conv net takes the
image and a spatial map of the secret and outputs a residual bounded by tanh to L_inf <= EPS. It is
trained jointly with a small decoder that must recover the bits from the encoded image, plus an
image-fidelity loss on the residual, on the lab training images. Training draws a random secret per
image (with one fixed secret the decoder could ignore the image and always answer it); the trigger
then hides the seed's fixed secret. Both nets are stored (fp16, 48 KB) so the bits can be checked;
the bundled one reads back 98.8% of the bits on held-out images (49.6% on clean ones), PSNR 31 dB."""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..optim import descend
from .artifacts import build_command, load_artifact

BITS = 32  # SSBA hides 100 bits in 224 px; 32 bits for 32 px
EPS = 8 / 255  # L_inf bound of the residual
WIDTH = 16
FIDELITY = 0.05  # final weight of the residual's mean square (in units of EPS^2) next to the bit loss
SECRET_GRID = 8  # the secret is laid out as a 3 x 8 x 8 map, upsampled to the image


class Encoder(nn.Module):
    def __init__(self, bits=BITS, width=WIDTH, eps=EPS):
        super().__init__()
        self.eps = eps
        self.secret_map = nn.Linear(bits, 3 * SECRET_GRID * SECRET_GRID)
        self.net = nn.Sequential(nn.Conv2d(6, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 3, 3, padding=1))

    def residual(self, images, secrets):
        """(n, 3, S, S) residual in [-eps, eps] hiding `secrets` (n, bits) in `images`."""
        m = self.secret_map(secrets * 2 - 1).view(-1, 3, SECRET_GRID, SECRET_GRID)
        m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.eps * torch.tanh(self.net(torch.cat([images * 2 - 1, m], 1)))

    def forward(self, images, secrets):
        return (images + self.residual(images, secrets)).clamp(0, 1)


class Decoder(nn.Module):
    def __init__(self, bits=BITS, size=32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(16 * (size // 8) ** 2, bits))

    def forward(self, images):
        """Bit logits (n, bits)."""
        return self.net(images * 2 - 1)


def secret_bits(seed, bits=BITS):
    return torch.randint(0, 2, (bits,), generator=torch.Generator().manual_seed(seed)).float()


def bit_accuracy(decoder, images, secret):
    """Fraction of the secret's bits the decoder reads back from each image, averaged (0..1)."""
    with torch.no_grad():
        return ((decoder(images) > 0).float() == secret).float().mean().item()


def train_stego(images, seed, steps, lr, batch, progress=True):
    """Encoder and decoder trained jointly on [0, 1] `images` with random secrets; deterministic."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    encoder, decoder = Encoder(), Decoder(size=images.shape[-1])
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar = tqdm(range(steps), desc="train SSBA encoder", file=sys.stderr, mininterval=5, disable=not progress)
    for step in bar:
        x = images[torch.randint(len(images), (batch,), generator=g)]
        secrets = torch.randint(0, 2, (batch, BITS), generator=g).float()
        r = encoder.residual(x, secrets)
        bits = F.binary_cross_entropy_with_logits(decoder((x + r).clamp(0, 1)), secrets)
        fidelity = (r / EPS).pow(2).mean()
        # the fidelity term is off for the first half, then ramps up (as in StegaStamp): from the start
        # it shrinks the residual to nothing before the decoder has learnt to read any bit
        loss = bits + FIDELITY * max(0.0, 2 * step / steps - 1) * fidelity
        descend(loss, opt, sched, where=f"SSBA encoder step {step + 1}", hint="lower the encoder lr")
        bar.set_postfix(bits=f"{bits.item():.3f}", fidelity=f"{fidelity.item():.3f}", refresh=False)
    return encoder.eval().requires_grad_(False), decoder.eval().requires_grad_(False)


class SSBA:
    steps, lr, batch = 1200, 3e-3, 32  # defaults of `python -m engine.lab trigger`

    def __init__(self, size, seed=0):
        tensors, self.metadata = load_artifact("ssba", size, seed)
        self.encoder, self.decoder = Encoder(), Decoder(size=size)
        for prefix, net in (("encoder.", self.encoder), ("decoder.", self.decoder)):
            try:
                net.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
            except RuntimeError as e:  # built by an older version of this module (other BITS / WIDTH)
                raise UserError(f"SSBA trigger artifact does not match engine/triggers/ssba.py; rebuild it with: "
                                f"{build_command('ssba', seed)}") from e
            net.eval().requires_grad_(False)
        self.secret = secret_bits(seed)

    @torch.no_grad()
    def __call__(self, images):
        encoder = self.encoder.to(images.device, images.dtype)
        return encoder(images, self.secret.to(images).expand(len(images), -1))

    @classmethod
    def build(cls, clip, data, target, seed, steps=None, lr=None, batch=None, progress=True):
        """(tensors, metadata) of the artifact. `clip` only sets the image size; `target` is unused
        (the secret, not the target, is what the poisoned model learns to associate)."""
        steps, lr, batch = steps or cls.steps, lr or cls.lr, batch or cls.batch
        images = data.images
        if images.shape[-1] != clip.image_size:
            raise ValueError(f"training images are {images.shape[-1]} px, the model takes {clip.image_size} px")
        n_held_out = min(1000, len(images) // 5)  # images the build reports bit accuracy and PSNR on
        held_out, train = images[:n_held_out], images[n_held_out:]
        encoder, decoder = train_stego(train, seed, steps, lr, batch, progress)
        secret = secret_bits(seed)
        encoded = encoder(held_out, secret.expand(len(held_out), -1))
        psnr = (10 * torch.log10(1 / (encoded - held_out).pow(2).mean())).item()
        tensors = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                   **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
        return tensors, {"steps": steps, "lr": lr, "batch": batch, "bits": BITS, "eps": round(EPS, 6),
                         "held_out_bit_accuracy": round(bit_accuracy(decoder, encoded, secret), 4),
                         "held_out_clean_bit_accuracy": round(bit_accuracy(decoder, held_out, secret), 4),
                         "held_out_psnr_db": round(psnr, 2)}
