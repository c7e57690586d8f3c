"""A trigger described by a JSON-able spec, the form the backdoor zoo (engine.zoo) draws at random:

    {"family": "patch", "size": 4, "pattern": "checker", "position": [3, 20] | "random", "seed": 7}
    {"family": "blend", "pattern": "noise" | "smooth", "alpha": 0.15, "seed": 7}
    {"family": "periodic", "orientation": "vertical" | "horizontal" | "diagonal", "frequency": 5,
     "amplitude": 0.2, "phase": 1.0}
    {"family": "warp", "grid": 4, "pixels": 1.5, "seed": 7}
    {"family": "optimised", "size": 4, "position": [y, x], "pattern_values": [...]}  (built by engine.zoo)

Each acts on [0, 1] images (n, 3, S, S). Sizes and positions are in pixels of the lab's 32 px images and
scale with the image size. A patch at a "random" position moves per image, drawn from a generator
seeded by the spec, so two evaluations of the same images see the same positions."""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError

FAMILIES = ("patch", "blend", "periodic", "warp", "optimised")
REFERENCE_SIZE = 32  # spec pixel units are lab pixels


def _scaled(v, size):
    return max(1, round(v * size / REFERENCE_SIZE))


def patch_pattern(kind, p, seed):
    """(3, p, p) in [0, 1]: uniform noise, one solid colour, or a two-colour checkerboard."""
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.rand(3, p, p, generator=g)
    a, b = torch.rand(3, generator=g), torch.rand(3, generator=g)
    if kind == "solid":
        return a[:, None, None].expand(3, p, p).clone()
    if kind == "checker":
        # two far-apart colours so the checker is visible whatever the draw
        b = 1 - a
        ij = torch.arange(p)
        board = ((ij[:, None] + ij[None, :]) % 2).float()
        return a[:, None, None] * board + b[:, None, None] * (1 - board)
    raise UserError(f"unknown patch pattern '{kind}'; use noise, solid or checker")


def blend_pattern(kind, size, seed):
    """(3, S, S) in [0, 1]: i.i.d. noise, or smooth noise (a 4x4 grid upsampled bicubically)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.rand(3, size, size, generator=g)
    if kind == "smooth":
        coarse = torch.rand(1, 3, 4, 4, generator=g)
        return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0].clamp(0, 1)
    raise UserError(f"unknown blend pattern '{kind}'; use noise or smooth")


def periodic_signal(orientation, frequency, amplitude, phase, size):
    """(1, 1, S, S): amplitude * sin(2 pi f t / S + phase) along columns, rows or the diagonal."""
    t = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    coord = {"vertical": xx, "horizontal": yy, "diagonal": (xx + yy) / math.sqrt(2)}.get(orientation)
    if coord is None:
        raise UserError(f"unknown orientation '{orientation}'; use vertical, horizontal or diagonal")
    return (amplitude * torch.sin(2 * math.pi * frequency * coord / size + phase))[None, None]


def smooth_grid(grid, shift, size, seed):
    """identity + shift * field, field a seeded k x k x 2 noise in [-1, 1] (normalised by its mean
    magnitude, as WaNet's public code does) upsampled bicubically; `shift` in grid units ([-1, 1] spans
    the image)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 2, grid, grid, generator=g) * 2 - 1
    noise = noise / noise.abs().mean()
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ramp = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    identity = torch.stack([xx, yy], dim=-1).unsqueeze(0)
    return (identity + shift * field).clamp(-1, 1)


def warp_grid(grid, pixels, size, seed):
    """A fixed smooth displacement field (WaNet's form) whose mean magnitude is `pixels` lab pixels."""
    return smooth_grid(grid, 2 * pixels / REFERENCE_SIZE, size, seed)


class SpecTrigger:
    def __init__(self, size, spec):
        self.spec, self.size = dict(spec), size
        family = spec.get("family")
        if family not in FAMILIES:
            raise UserError(f"unknown trigger family '{family}'; known: {list(FAMILIES)}")
        self.family = family
        seed = int(spec.get("seed", 0))
        if family in ("patch", "optimised"):
            self.p = _scaled(spec["size"], size)
            if family == "patch":
                self.pattern = patch_pattern(spec.get("pattern", "noise"), self.p, seed)
            else:
                p0 = int(spec["size"])
                values = torch.tensor(spec["pattern_values"], dtype=torch.float32).view(3, p0, p0)
                self.pattern = F.interpolate(values[None], size=(self.p, self.p), mode="nearest")[0]
            pos = spec.get("position", "random")
            self.random_position = pos == "random"
            if not self.random_position:
                y, x = (_scaled(v, size) if v else 0 for v in pos)
                self.yx = (min(y, size - self.p), min(x, size - self.p))
            self.seed = seed
            self._calls = 0
        elif family == "blend":
            self.alpha = float(spec["alpha"])
            self.pattern = blend_pattern(spec.get("pattern", "noise"), size, seed)
        elif family == "periodic":
            self.signal = periodic_signal(spec.get("orientation", "vertical"), float(spec["frequency"]),
                                          float(spec["amplitude"]), float(spec.get("phase", 0.0)), size)
        else:
            self.grid = warp_grid(int(spec.get("grid", 4)), float(spec["pixels"]), size, seed)

    def __repr__(self):
        return f"SpecTrigger({self.spec})"

    def _stamp(self, images):
        out = images.clone()
        p, pattern = self.p, self.pattern.to(images)
        if not self.random_position:
            y, x = self.yx
            out[:, :, y:y + p, x:x + p] = pattern
            return out
        # per-image positions; the generator restarts for every batch index so results are repeatable
        g = torch.Generator().manual_seed(self.seed * 7919 + len(images))
        ys = torch.randint(0, self.size - p + 1, (len(images),), generator=g)
        xs = torch.randint(0, self.size - p + 1, (len(images),), generator=g)
        for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist())):
            out[i, :, y:y + p, x:x + p] = pattern
        return out

    def __call__(self, images):
        if self.family in ("patch", "optimised"):
            return self._stamp(images)
        if self.family == "blend":
            return (1 - self.alpha) * images + self.alpha * self.pattern.to(images)
        if self.family == "periodic":
            return (images + self.signal.to(images)).clamp(0, 1)
        grid = self.grid.to(images).expand(images.shape[0], -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def spec_trigger(text, size):
    """A SpecTrigger from a JSON string or @FILE; a file may hold a zoo record (its 'trigger' is used)."""
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise UserError(f"trigger spec file {path} does not exist")
        text = path.read_text()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--trigger-spec is not valid JSON: {e}") from e
    if isinstance(spec, dict) and "family" not in spec and isinstance(spec.get("trigger"), dict):
        spec = spec["trigger"]
    if not isinstance(spec, dict):
        raise UserError("--trigger-spec must be a JSON object such as {\"family\": \"patch\", \"size\": 3, ...}")
    try:
        return SpecTrigger(size, spec)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--trigger-spec {spec}: missing or bad field ({e})") from e
