"""The defenses as a library: one registry, name -> Defense(config, tune), every tuner with one signature.

    cfg = purify.config("repair", "lab-vit", epochs=20)          # the defense's defaults + overrides
    tuned = purify.tune("repair", clip, shots, text, cfg)        # a runs.Tuned; tuned.after still empty
    tuned.after = purify.measure(tuned, clip, test, trigger, target, text)

`config(name, model, **overrides)` starts from the defense's own defaults (the paper's for real CLIP, its
module's LAB_DEFAULTS for lab models); overrides that are None are ignored, so a CLI can pass every flag.
The overrides are the knobs defenses share (GENERIC); anything else is a field of the config dataclass,
set with dataclasses.replace. engine.tune parses its flags into these calls."""
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from . import prompted_vit
from .data import DEFAULT_TEMPLATES
from .defenses import cbpt, cleanclip, linear_probe, repair, rvpt
from .evaluate import evaluate_attack
from .runs import Tuned

# overrides config() accepts: epochs (steps for cbpt/coop), lr, batch, seed, augment; RVPT's alpha and
# margin; the visual prompts' tokens (b) and start (D)
GENERIC = ("epochs", "lr", "batch", "seed", "augment", "alpha", "margin", "tokens", "start")


@dataclass
class Options:
    """How to run a tuner (not what it optimises)."""
    backend: str = "shared"        # prompted-ViT implementation (engine.prompted_vit.BACKENDS)
    progress: bool = True
    log: Callable = None           # one-line progress notes (repair's detector), e.g. print
    detection: dict = None         # repair: engine.inversion.detect's result on these shots, if computed
    unlabelled: object = None      # repair: extra clean images (N, 3, S, S) in [0, 1], no labels, if the defender has them
    templates: list = field(default_factory=lambda: list(DEFAULT_TEMPLATES))   # cleanclip's classifier


@dataclass(frozen=True)
class Defense:
    config: Callable     # (model_name, **overrides) -> the defense's config dataclass
    tune: Callable       # (clip, shots, text, cfg, Options) -> runs.Tuned with after = {}
    summary: str


def _pick(overrides, *keys):
    return {k: overrides[k] for k in keys if overrides.get(k) is not None}


@dataclass
class RvptCbptConfig:
    rvpt: rvpt.RVPTConfig
    cbpt: cbpt.CBPTConfig

    def as_dict(self):
        return asdict(self)


# ---------------------------------------------------------------- tuners

def _visual_prompts(name):
    def run(clip, shots, text, cfg, opts):
        t0 = time.time()
        prompts, history = rvpt.tune(clip, shots, text, cfg, opts.backend, progress=opts.progress)
        return Tuned(name, {}, time.time() - t0, prompted_vit.parameter_count(prompts), cfg.as_dict(), history,
                     backend=opts.backend, prompts=prompts, start=cfg.start)
    return run


def _cbpt_tuned(name, res, cfg, seconds, **kw):
    extra = {}
    if res["mask"] is not None:
        extra = {"inversion_loss_history": [round(x, 5) for x in res["inversion_history"]],
                 "mask_mean": round(res["mask"].mean().item(), 5)}
    return Tuned(name, {}, seconds, res["prompts"].ctx.numel(), cfg.as_dict(), res["history"],
                 classifier=res["text"], context=res["prompts"].ctx,
                 trigger=None if res["mask"] is None else (res["mask"], res["pattern"]), extra=extra, **kw)


def _text_prompts(name):
    def run(clip, shots, text, cfg, opts):
        t0 = time.time()
        res = cbpt.tune(clip, shots, text, cfg, progress=opts.progress)
        return _cbpt_tuned(name, res, cfg, time.time() - t0)
    return run


def _rvpt_cbpt(clip, shots, text, cfg, opts):
    """RVPT's visual prompts first, then CBPT on the prompted image encoder (inversion and cached features
    through the prompts); the run keeps both, and the export folds both."""
    t0 = time.time()
    prompts, rhist = rvpt.tune(clip, shots, text, cfg.rvpt, opts.backend, progress=opts.progress)
    res = cbpt.tune(clip, shots, text, cfg.cbpt, progress=opts.progress, encode=_encoder(prompts, opts.backend, clip))
    tuned = _cbpt_tuned("rvpt+cbpt", res, cfg.cbpt, time.time() - t0, backend=opts.backend, prompts=prompts,
                        start=cfg.rvpt.start)
    tuned.tuned_params += prompted_vit.parameter_count(prompts)
    tuned.config, tuned.history = cfg.as_dict(), rhist + res["history"]
    tuned.extra["rvpt_epochs"] = len(rhist)
    return tuned


def _linear_probe(clip, shots, text, cfg, opts):
    t0 = time.time()
    weight, history = linear_probe.tune(clip, shots, cfg, progress=opts.progress)
    return Tuned("linear-probe", {}, time.time() - t0, weight.numel(), cfg.as_dict(), history, classifier=weight)


def _cleanclip(clip, shots, text, cfg, opts):
    t0 = time.time()
    tuned_clip, history = cleanclip.tune(clip, shots, cfg, progress=opts.progress)
    # zero-shot through the fine-tuned text tower (measure() rebuilds the classifier with the run's templates)
    return Tuned("cleanclip", {}, time.time() - t0, prompted_vit.parameter_count(tuned_clip.model), cfg.as_dict(),
                 history, model=tuned_clip.model)


def _repair(clip, shots, text, cfg, opts):
    """Detect (mask, stripe and warp inversions on the shots), then distil deep visual prompts so the dummy
    trigger stops working; nothing is tuned when the detector reads the model clean."""
    t0 = time.time()
    res = repair.tune(clip, shots, text, cfg, opts.backend, progress=opts.progress, log=opts.log,
                      detection=opts.detection, unlabelled=opts.unlabelled)
    found = res["detection"]
    extra = {"detection": {"verdict": found["verdict"], "flagged_by": found["flagged_by"],
                           "suspected_target": shots.classes[found["suspected_target"]], "checks": found["checks"],
                           "mask": found["mask"], "stripes": found["stripes"], "warp": found["warp"]},
             "repaired": res["prompts"] is not None, "gate_keep": res["keep"]}
    if res["prompts"] is None:
        return Tuned("repair", {}, time.time() - t0, 0, cfg.as_dict(), [], extra=extra)
    return Tuned("repair", {}, time.time() - t0, prompted_vit.parameter_count(res["prompts"]), cfg.as_dict(),
                 res["history"], backend=opts.backend, prompts=res["prompts"], start=cfg.start, extra=extra,
                 gate=found["suspected_target"] if cfg.gate else None, gate_keep=res["keep"])


# ---------------------------------------------------------------- configs

def _rvpt_config(model, alpha=None, **o):
    return rvpt.default_config(model, alpha=alpha, **_pick(o, "start", "tokens", "margin", "lr", "epochs", "batch",
                                                           "seed", "augment"))


def _cbpt_config(invert):
    return lambda model, **o: cbpt.default_config(model, invert=invert, **_pick(o, "lr", "epochs", "seed"))


def _rvpt_cbpt_config(model, **o):
    # --epochs / --lr apply to the RVPT stage; CBPT keeps its own
    return RvptCbptConfig(_rvpt_config(model, **o), cbpt.default_config(model, **_pick(o, "seed")))


def _repair_config(model, **o):
    return replace(repair.RepairConfig(), **_pick(o, "seed", "lr", "epochs", "batch", "augment"))


DEFENSES = {
    "repair": Defense(_repair_config, _repair, "detect the trigger, then distil deep visual prompts against it"),
    "rvpt": Defense(_rvpt_config, _visual_prompts("rvpt"), "deep visual prompts, CE + feature repelling (RVPT)"),
    "vpt": Defense(lambda model, **o: _rvpt_config(model, **{**o, "alpha": 0.0}), _visual_prompts("vpt"),
                   "plain deep VPT: RVPT with alpha 0 (the ablation)"),
    "cbpt": Defense(_cbpt_config(True), _text_prompts("cbpt"), "trigger inversion + class-wise text prompts (CBPT)"),
    "coop": Defense(_cbpt_config(False), _text_prompts("coop"), "class-wise text prompts on clean CE (CoOp)"),
    "rvpt+cbpt": Defense(_rvpt_cbpt_config, _rvpt_cbpt, "RVPT's visual prompts, then CBPT through them"),
    "linear-probe": Defense(lambda model, **o: linear_probe.default_config(**_pick(o, "lr", "epochs", "seed")),
                            _linear_probe, "a linear classifier on frozen features"),
    "cleanclip": Defense(lambda model, **o: cleanclip.default_config(model, **_pick(o, "lr", "epochs", "seed")),
                         _cleanclip, "fine-tune the whole CLIP on clean pairs (CleanCLIP)"),
}


def _defense(name):
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; one of {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name]


def config(name, model="lab-vit", **overrides):
    """The defense's config for `model` (lab defaults for lab-* models) with the GENERIC overrides applied."""
    unknown = sorted(set(overrides) - set(GENERIC))
    if unknown:
        raise TypeError(f"config() takes the overrides {', '.join(GENERIC)}, not {', '.join(unknown)}; set other "
                        f"fields with dataclasses.replace on the returned config")
    return _defense(name).config(model, **overrides)


def tune(name, clip, shots, text, cfg=None, options=None):
    """Run defense `name` on the clean few-shot ImageSet `shots` with the zero-shot classifier `text` (K, E).
    cfg: from config() (default: config(name)); options: Options. Returns a runs.Tuned with after = {}."""
    defense = _defense(name)
    return defense.tune(clip, shots, text, cfg if cfg is not None else config(name), options or Options())


def _encoder(prompts, backend, clip):
    """The tuned prompts' encoder for evaluation: `shared` for the naive backend (same numbers, faster)."""
    return prompted_vit.encoder(clip.visual, prompts, "shared" if backend in ("naive", "torch") else backend)


def gated(frozen, prompted, text, k, keep=None):
    """Features that classify as the frozen encoder's except where it predicts class k: there (and only
    there, so at a fraction of the cost) the prompted encoder's. A repaired backdoor sends triggered images
    to k under the frozen model, so the prompts still see every one of them, while the clean images the
    frozen model puts in other classes keep its answer and cost no accuracy. `keep`: where the prompted
    feature stays this close (cosine) to the frozen one, the frozen feature stands (keeps_frozen)."""
    def encode(x):
        z = frozen(x)
        pick = (F.normalize(z.float(), dim=-1) @ text.t().to(z.device)).argmax(1) == k
        if pick.any():
            z = z.clone()
            zp = prompted(x[pick]).to(z.dtype)
            z[pick] = zp if keep is None else torch.where(keeps_frozen(zp, z[pick], keep)[:, None], z[pick], zp)
        return z
    return encode


def keeps_frozen(prompted, frozen, keep):
    """Per image: the prompts moved its feature less than `keep` allows (cos >= keep), so the frozen answer
    stands. The clean term holds a clean image's prompted feature near its frozen one, while a triggered
    image's moves far (to where its clean content lies): the target class's own images, which the
    prompts would otherwise misread most, keep their class (engine.defenses.repair.keep_threshold)."""
    return F.cosine_similarity(prompted.float(), frozen.float(), dim=-1) >= keep


def tuned_view(tuned, clip, text, classes, templates=DEFAULT_TEMPLATES):
    """(clip, encode, classifier) that classify as the tuned defense does: fine-tuned weights, then prompts
    (gated to the frozen model's predictions of one class where the defense says so), then a tuned
    classifier, each where the defense has one."""
    import dataclasses
    encode = None
    if tuned.model is not None:
        clip = dataclasses.replace(clip, model=tuned.model)
        text = clip.text_features(classes, templates)
    if tuned.prompts is not None:
        encode = _encoder(tuned.prompts, tuned.backend, clip)
    if tuned.classifier is not None:
        text = tuned.classifier
    if tuned.prompts is not None and tuned.gate is not None:
        encode = gated(clip.encode_image, encode, text, tuned.gate, tuned.gate_keep)
    return clip, encode, text


def measure(tuned, clip, test, trigger, target, text, templates=DEFAULT_TEMPLATES):
    """CA/ASR/PA % on the test ImageSet through what the defense tuned."""
    clip, encode, text = tuned_view(tuned, clip, text, test.classes, templates)
    return evaluate_attack(clip, test, trigger, target, encode=encode, text=text)
