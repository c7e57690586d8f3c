"""Repair: invert the trigger on the few shots, then tune deep visual prompts so that the prompted encoder
maps dummy-triggered shots where the frozen encoder maps the clean ones, while clean features are
distilled from the frozen model. No labels are used by the prompt tuning (only by the inversion's
choice of target classes; and by the optional decision term with clean_ce_labels), so unlabelled clean
images could be added.

    loss = w_clean (1 - cos(p(x), f(x))) + w_trigger (1 - cos(p(T(x)), f(x)))

p = prompted encoder, f = the frozen one, T = the inverted trigger of the family that flagged
(engine.inversion.detect: a stamped mask + pattern, stripes or a warp). When the detector reads the model clean,
nothing is tuned unless `always` (then T is the mask inversion's trigger): a clean model costs nothing.
With `gate` (default) the repaired model uses the prompts only on images the frozen model puts in the
suspected target class (engine.purify.gated): the triggered images all land there, most clean ones do not;
and there, only where they move the feature as far as they move all but a few stand-in-triggered shots
(keep_threshold): the target class's own images, which they would misread most, keep the frozen answer."""
import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from .. import distributed, prompted_vit
from ..errors import UserError
from ..evaluate import predict
from ..augment import augment
from ..inversion import detect as det
from ..inversion import LOGIT_SCALE, targeted
from . import minibatch_epochs


@dataclass
class RepairConfig:
    detect: det.DetectConfig = field(default_factory=det.DetectConfig)
    always: bool = False         # repair even when the detector reads the model clean
    gate: bool = True            # the prompts answer only where the frozen model predicts the suspected target
                                 # (engine.purify.gated; chosen on dev: bench/results/sweeps/repair_dev.md)
    keep_quantile: float = 0.99  # gate: where the prompts move a feature less than they move this share of the
                                 # shots the final stand-in triggers send to k, the frozen answer stands
                                 # (keep_threshold; 0: off; chosen on dev with extra=("blend",):
                                 # bench/results/sweeps/repair_dev_blend.md)
    keep_weight: float = 0.5     # > 0: the keep cut balances instead (balanced_cut): it minimises the target
                                 # class's own shots the prompts would answer (each 1/K of the images) plus
                                 # keep_weight x the stand-in-triggered shots kept; keep_quantile then only
                                 # where no shot of the target class is read as it (chosen on dev:
                                 # bench/results/sweeps/repair_dev_keep_weight.md)
    keep_cap: float = 0.5        # > 0 (with keep_weight): the balanced cut never rises above this quantile of the
                                 # target class's own shots' cosines, so at least that share of them keeps the
                                 # frozen answer where the prompts move the class far (0: off; chosen on dev:
                                 # bench/results/sweeps/repair_dev_keep_cap.md)
    keep_each: bool = False      # with more than one stand-in, the cut holds for each: the largest of their
                                 # quantiles (else one quantile over all their shots; at 0.99 the two measured
                                 # alike on the dev models both ran on)
    keep_from: str = "all"       # whose triggered shots the keep cut reads: "all" stand-ins, or "flagged" (the
                                 # flagged family's alone; the others still train the prompts). Tried on dev and
                                 # not adopted: bench/results/sweeps/repair_dev_keep_from.md
    refine_steps: int = 0        # tighten a mask trigger alone with a larger mask penalty before the repair
    refine_lam_factor: float = 4.0
    occluded_target: bool = False  # stamped triggers: distil T(x) towards f(x with the region noise-filled)
    mixup: bool = False          # also distil clean features on mixtures of two shots (more inputs, no labels)
    adversarial: bool = True     # mask triggers: keep re-inverting the trigger against the prompted encoder
    adv_lam: float = 0.05        # adversarial: mask-size weight of the trigger's objective (sum(m), px)
    adv_lr: float = 0.02         # adversarial: Adam on the trigger's mask and pattern logits (0.1 cost more CA)
    adv_steps: int = 1           # adversarial: trigger steps before each prompt step
    adv_mask: bool = True        # adversarial mask triggers: the mask moves too (else only the pattern, inside
                                 # the inverted mask: the trigger cannot grow into the class's real features)
    adversarial_stripes: bool = True    # stripe triggers too (the pattern re-optimised within the stripes' eps)
    # more stand-ins beside the flagged trigger, each inverted towards the suspected target on the shots
    # (extra_steps) and then adversarial like it: "blend" (a global pattern at blend_alpha, the family a
    # small mask stands in for worst), "bounded" (a global additive pattern, |d| <= bounded_eps), "warp"
    # (a smooth warp of at most detect.mask.warp_pixels), "mask";
    # the flagged family's own name adds a restart of it (another seed); the terms are averaged (w_extra None)
    extra: tuple = ("blend",)    # chosen on dev (bench/results/sweeps/repair_dev_blend.md): the keep rule kept
                                 # blended triggers that a stamped mask stand-in alone does not resemble
    w_extra: float = None        # else each extra stand-in's term (also_mask's too) weighs this, beside w_trigger
                                 # on the flagged trigger's (a second stand-in then does not halve the first's)
    also_mask: bool = True       # a model flagged by stripes or a warp: the mask stand-in towards the same target
                                 # too (what repairs most backdoors of every family when the mask flags them;
                                 # chosen on dev: bench/results/sweeps/repair_dev_stripes.md)
    extra_steps: int = 100
    blend_alpha: float = 0.2
    bounded_eps: float = 0.1
    start: int = 0               # D: unprompted leading blocks
    tokens: int = 16             # b: prompt tokens per block
    init_std: float = 0.02
    w_clean: float = 30.0        # w_clean from a bundled BadNet sweep (10 / 30 / 100); w_trigger and clean_focus
    w_trigger: float = 70.0      # chosen on the zoo's dev split (bench/results/sweeps/repair_dev.md): a stronger
                                 # trigger term removes more backdoors, the focus keeps the gate's images
    clean_focus: float = 12.0    # gate: a clean image the frozen model puts in the suspected target weighs
                                 # 1 + clean_focus in the clean term (the gated model's prompts answer only those)
    w_clean_ce: float = 0.0      # and a cross-entropy of the prompted zero-shot logits towards the frozen model's
                                 # prediction (its decision, which is all the gate reads; no labels), same weights
    clean_ce_labels: bool = False  # that cross-entropy towards the shots' labels instead (unlabelled extras: still
                                   # the frozen prediction): a shot the frozen model misreads as k is not taught k
    clean_ce_soft: bool = False  # or towards the frozen model's softmax (distillation of its confidence, which a
                                 # hard target would push past what the frozen model holds). The term keeps the
                                 # target class's own images but lets more of the backdoor through; off, as tried
                                 # on dev: bench/results/sweeps/repair_dev_clean_ce.md
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 30
    batch: int = 32
    seed: int = 0
    augment: bool = True

    def as_dict(self):
        return asdict(self)


def _mean(values, weight=None):
    return values.mean() if weight is None else (weight * values).sum() / weight.sum()


def distill_loss(prompted, frozen, weight=None):
    return _mean(1 - F.cosine_similarity(prompted, frozen, dim=-1), weight)


class AdversarialTrigger:
    """A trigger that keeps adapting to the prompts being tuned: before each prompt step, adv_steps Adam
    steps on its parameters towards CE(prompted logits, k) (+ adv_lam * its size, a mask's sum(m)), so the
    prompts must defeat every trigger near the inverted one, not just the one the inversion happened to
    find. `fam`: one class's trigger parameters (a targeted family with K = 1: mask, blend, bounded, warp)."""

    def __init__(self, k, text, cfg, fam):
        self.fam = fam
        self.opt = torch.optim.Adam(self.fam.params, lr=cfg.adv_lr)
        self.k, self.text, self.lam, self.steps = k, text, cfg.adv_lam, cfg.adv_steps

    def step(self, clip, prompts, x, backend):
        for _ in range(self.steps):
            z = prompted_vit.forward(clip.visual, prompts, clip.normalise(self.fam.apply(x[None])[0]), backend)["feature"]
            logits = LOGIT_SCALE * F.normalize(z.float(), dim=-1) @ self.text.t()
            loss = F.cross_entropy(logits, torch.full((len(x),), self.k, device=x.device)) + self.lam * self.fam.size().sum()
            self.opt.zero_grad(set_to_none=True)
            loss.backward(inputs=self.fam.params)
            self.opt.step()

    def __call__(self, x):
        with torch.no_grad():
            return self.fam.apply(x[None])[0]   # one class's trigger on a (1, B, ...) batch


def tune_prompts(clip, images, triggers, cfg, backend="shared", progress=True, neutral=None, unlabelled=None,
                 focus=None, labels=None):
    """Deep visual prompts distilled from the frozen encoder on clean and T-triggered images, for every T
    in `triggers` (one callable or a list; their terms are averaged). The triggered images' target is
    f(neutral(x)) (default f(x)): for a stamped trigger, the same region filled with noise, so the prompts
    need not recover what the stamp hides, only ignore what it shows. A trigger with a `step` method
    (AdversarialTrigger) is updated against the prompts before each step. `unlabelled`: extra clean images;
    each step distils a batch of them too (the epochs still run over `images`). `focus`: (classifier (K, E),
    class k): with cfg.clean_focus, the clean images the frozen model predicts as k weigh more. `labels`: the
    shots' classes, the cross-entropy's target with cfg.clean_ce_labels."""
    if cfg.clean_ce_labels and cfg.clean_ce_soft:
        raise UserError("repair: the decision term aims at the labels (clean_ce_labels) or the frozen softmax "
                        "(clean_ce_soft), not both")
    if cfg.w_clean_ce and cfg.clean_ce_labels and labels is None:
        raise UserError("repair clean_ce_labels needs the shots' labels")
    triggers = list(triggers) if isinstance(triggers, (list, tuple)) else [triggers]
    torch.manual_seed(cfg.seed)
    prompts = prompted_vit.VisualPrompts.for_visual(clip.visual, cfg.start, cfg.tokens, cfg.init_std).to(clip.device)
    opt = torch.optim.SGD(prompts.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    n = len(images)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * math.ceil(n / cfg.batch))
    images = images.to(clip.device)
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_of(b):
        x = augment(images[b], g) if cfg.augment else images[b]
        n = len(x)
        mixed = []
        if cfg.mixup:
            lam = torch.rand(n, 1, 1, 1, generator=g).to(x)
            mixed = [lam * x + (1 - lam) * x[torch.randperm(n, generator=g).to(x.device)]]
        if unlabelled is not None:   # as many extra clean images as shots in the batch
            u = unlabelled[torch.randint(len(unlabelled), (n,), generator=g)].to(x.device)
            mixed.append(augment(u, g) if cfg.augment else u)
        for t in triggers:
            if hasattr(t, "step"):   # on the whole batch, on every rank alike (not sharded)
                t.step(clip, prompts, x, backend)
        triggered = [t(x) for t in triggers]
        hidden = x if neutral is None else neutral(x)
        # every random draw above was made for the whole batch; under torchrun each rank takes its share
        shot_labels = labels[b].to(x.device) if labels is not None else x.new_zeros(n, dtype=torch.long)
        x, hidden, shot_labels, *parts, weight = distributed.shard(x, hidden, shot_labels, *triggered, *mixed)
        triggered, mixed = parts[:len(triggers)], parts[len(triggers):]
        clean = torch.cat([x, *mixed])
        both = clip.normalise(torch.cat([clean, *triggered]))
        with torch.no_grad():
            target = clip.encode_image(both[:len(clean)])
            target_t = target[:len(x)] if neutral is None else clip.encode_image(clip.normalise(hidden))
        z = prompted_vit.forward(clip.visual, prompts, both, backend)["feature"]
        focus_weight, decision = None, 0.0
        if focus is not None and (cfg.clean_focus or cfg.w_clean_ce):
            frozen_pred = (F.normalize(target.float(), dim=-1) @ focus[0].t()).argmax(1)
            focus_weight = 1 + cfg.clean_focus * (frozen_pred == focus[1]).float()
            if cfg.w_clean_ce:
                want = frozen_pred
                if cfg.clean_ce_soft:
                    want = F.softmax(LOGIT_SCALE * F.normalize(target.float(), dim=-1) @ focus[0].t(), dim=-1)
                elif cfg.clean_ce_labels:   # the shots come first in `clean`, then the mixed / unlabelled images
                    want = torch.cat([shot_labels, frozen_pred[len(x):]])
                logits = LOGIT_SCALE * F.normalize(z[:len(clean)].float(), dim=-1) @ focus[0].t()
                decision = cfg.w_clean_ce * _mean(F.cross_entropy(logits, want, reduction="none"), focus_weight)
        terms = [distill_loss(zt, target_t) for zt in z[len(clean):].split(len(x))]   # one per trigger
        trigger_term = cfg.w_trigger * sum(terms) / len(terms) if cfg.w_extra is None else \
            cfg.w_trigger * terms[0] + cfg.w_extra * sum(terms[1:])
        return weight * (decision + cfg.w_clean * distill_loss(z[:len(clean)], target, focus_weight) + trigger_term)

    history = minibatch_epochs(n, cfg.batch, cfg.epochs, g, loss_of, opt, sched, desc="repair prompts",
                               hint=f"lower the repair lr (now {cfg.lr})", progress=progress, device=clip.device,
                               sharded=distributed.active())
    return prompts.requires_grad_(False), history


def tune(clip, train, text, cfg, backend="shared", progress=True, log=None, detection=None, unlabelled=None):
    """Returns {'prompts' (None if nothing was tuned), 'detection' (engine.inversion.detect's), 'history',
    'keep' (the gate's keep cosine, keep_threshold's; None when off)}.
    `detection`: detect()'s result on these shots with cfg.detect, if already computed (engine.scan's)."""
    if cfg.keep_from not in ("all", "flagged"):
        raise UserError(f"repair keep_from '{cfg.keep_from}': use all or flagged")
    found = detection or det.detect(clip, train, text, cfg.detect, progress=progress, log=log)
    if found["verdict"] == "clean" and not cfg.always:
        return {"prompts": None, "detection": found, "history": [], "keep": None}
    trigger, neutral = found["trigger"], None
    if found["flagged_by"] in (None, "mask"):   # stripes / warp: their own inverted trigger, as found
        m, p = found["mask_trigger"]
        if cfg.refine_steps:
            m, p, found["refined_mask_size"] = targeted.refine(
                clip, train.images, train.labels, text, found["suspected_target"], m, p, cfg.detect.mask,
                cfg.refine_lam_factor, cfg.refine_steps, progress)
        m, p = m.to(clip.device), p.to(clip.device)
        trigger = AdversarialTrigger(found["suspected_target"], text.to(clip.device), cfg,
                                     _mask_family(m, p, cfg.adv_mask)) \
            if cfg.adversarial else lambda x: targeted.stamp(x, m, p)  # noqa: E731
        if cfg.occluded_target:
            g = torch.Generator(device=clip.device).manual_seed(cfg.seed + 1)
            neutral = lambda x: targeted.stamp(x, m, torch.rand(x.shape, generator=g, device=x.device))  # noqa: E731
    elif found["flagged_by"] == "stripes" and cfg.adversarial_stripes:
        stripe = replace(cfg.detect.mask, bounded_eps=cfg.detect.stripes.eps)   # the stripes' own bound
        trigger = AdversarialTrigger(found["suspected_target"], text.to(clip.device), cfg, targeted.BoundedFamily(
            1, train.images.shape[-1], stripe, None, clip.device, init=(found["stripe_pattern"][None],)))
    # an extra of the flagged family is a restart: the same family inverted again from another seed
    families = list(cfg.extra) + (["mask"] if cfg.also_mask and found["flagged_by"] not in (None, "mask") else [])
    extras = [AdversarialTrigger(found["suspected_target"], text.to(clip.device), cfg,
                                 _stand_in(family, clip, train, text, found, cfg, progress,
                                           restart=i + 1 if family == (found["flagged_by"] or "mask") else 0))
              for i, family in enumerate(families)]
    triggers = [trigger, *extras]
    prompts, history = tune_prompts(clip, train.images, triggers, cfg, backend, progress, neutral, unlabelled,
                                    focus=(text.to(clip.device), found["suspected_target"]), labels=train.labels)
    if isinstance(trigger, AdversarialTrigger) and found["flagged_by"] in (None, "mask"):
        found["adversarial_mask_size"] = trigger.fam.size().item()
    cut_from = triggers if cfg.keep_from == "all" else triggers[:1]
    keep = keep_threshold(clip, prompts, backend, train.images, cut_from, text, found["suspected_target"],
                          cfg.keep_quantile, cfg.keep_each, labels=train.labels, weight=cfg.keep_weight,
                          cap=cfg.keep_cap) \
        if cfg.gate and (cfg.keep_quantile or cfg.keep_weight) else None
    return {"prompts": prompts, "detection": found, "history": history, "keep": keep}


def keep_threshold(clip, prompts, backend, images, triggers, text, k, quantile, each=False, labels=None, weight=0.0,
                   cap=0.0):
    """The gate's keep cosine (engine.purify.keeps_frozen), from cos(prompted, frozen feature) over the shots
    that the final (adversarially trained) stand-in triggers send to k under the frozen model. Where the
    prompts move a k-predicted image's feature less than the cut, it is more likely one of the target class's
    own images than a triggered one (the prompts move a triggered image towards its clean content), and the
    frozen answer stands. `weight` > 0 (with `labels`): balanced_cut against the class-k shots the frozen
    model reads as k; else (or without such shots) the `quantile` of those cosines, which bounds the share of
    stand-in-triggered shots kept: of each stand-in's (`each`: the largest of their quantiles), or of all of
    them together. `cap` > 0: the balanced cut at most the `cap` quantile of the own shots' cosines. None when no
    stand-in reaches k, or when neither rule applies (quantile 0, no own shots)."""
    text = text.to(clip.device)
    pred = predict(clip, images, text)
    x = images[pred != k].to(clip.device)   # the shots the frozen model puts elsewhere
    cos = [_moved(clip, prompts, backend, t(x), text, k) for t in triggers]
    cos = [c for c in cos if len(c)]
    if not cos:
        return None
    own = images[(pred == k) & (labels == k)] if labels is not None and weight else images[:0]
    if len(own):
        own_cos = _moved(clip, prompts, backend, own.to(clip.device), text, k)
        cut = balanced_cut(torch.cat(cos), own_cos, len(text), weight)
        return min(cut, torch.quantile(own_cos, cap).item()) if cap and len(own_cos) else cut
    if not quantile:   # the quantile rule is off: without own shots, no cut
        return None
    if each:
        return max(torch.quantile(c, quantile).item() for c in cos)
    return torch.quantile(torch.cat(cos), quantile).item()


def _moved(clip, prompts, backend, x, text, k):
    """cos(prompted, frozen feature) of the images in x that the frozen model reads as k."""
    with torch.no_grad():
        x = clip.normalise(x)
        zf = clip.encode_image(x)
        hit = (F.normalize(zf.float(), dim=-1) @ text.t()).argmax(1) == k
        if not hit.any():
            return zf.new_zeros(0, dtype=torch.float32)
        zp = prompted_vit.forward(clip.visual, prompts, x[hit], backend)["feature"]
        return F.cosine_similarity(zp.float(), zf[hit].float(), dim=-1)


def balanced_cut(triggered, own, classes, weight):
    """The keep cut that minimises  share(own < c) / classes + weight * share(triggered >= c):  the target
    class's own images the prompts would answer (each class about 1/classes of the images: CA at stake) and
    the triggered ones whose frozen answer would stand (ASR), estimated on the shots. The cost only changes at
    an observed cosine, so among the cuts of least cost it takes the middle of the highest such interval
    (ties lean to removing the backdoor)."""
    edges = torch.cat([triggered, own]).float().sort().values
    # one candidate inside every interval between neighbouring cosines, plus one below and one above all
    cands = torch.cat([edges[:1] - 1e-3, (edges[1:] + edges[:-1]) / 2, edges[-1:] + 1e-3])
    cost = (own[None] < cands[:, None]).float().mean(1) / classes + \
        weight * (triggered[None] >= cands[:, None]).float().mean(1)
    best = cost <= cost.min() + 1e-9
    hi = int(best.nonzero().max())
    lo = hi
    while lo > 0 and best[lo - 1]:   # the contiguous run of least-cost candidates that ends at hi
        lo -= 1
    # the interval those candidates stand for runs from the cosine below the lowest to the one above the highest
    low = edges[lo - 1] if lo > 0 else edges[0] - 1e-3
    high = edges[hi] if hi < len(edges) else edges[-1] + 1e-3
    return ((low + high) / 2).item()


def _mask_family(m, p, moving_mask=True):
    """One mask trigger's parameters, for an AdversarialTrigger: mask and pattern, or the pattern alone."""
    fam = targeted.MaskFamily(1, m.shape[-1], None, None, m.device, init=(m[None], p[None]))
    if not moving_mask:
        fam.mask_logit.requires_grad_(False)
        fam.params = [fam.pattern_logit]
    return fam


def _stand_in(family, clip, train, text, found, cfg, progress, restart=0):
    """One class's trigger of `family` ("blend", "bounded", "warp" or "mask") towards the suspected target,
    inverted on the shots against the frozen model, as the parameters an AdversarialTrigger keeps adapting.
    `restart` > 0: inverted from the seed that many past the detector's (another start, another trigger)."""
    k = found["suspected_target"]
    if family == "mask" and found["mask"]["target_index"] == k and not restart:   # the detector's own inversion
        m, p = (t.to(clip.device) for t in found["mask_trigger"])
        return _mask_family(m, p, cfg.adv_mask)
    if family not in ("mask", "blend", "bounded", "warp"):
        raise UserError(f"repair extra trigger family '{family}': use mask, blend, bounded or warp")
    inv = replace(cfg.detect.mask, blend_alpha=cfg.blend_alpha, bounded_eps=cfg.bounded_eps,
                  seed=cfg.detect.mask.seed + restart)
    result, _, _ = targeted.invert(clip, train.images, train.labels, text, inv, classes=[k], family=family,
                                   steps=cfg.extra_steps, progress=progress)
    if family == "mask":
        return _mask_family(result[0][0].to(clip.device), result[1][0].to(clip.device), cfg.adv_mask)
    return targeted.FAMILIES[family](1, train.images.shape[-1], inv, None, clip.device,
                                     init=tuple(t if t is None else t.to(clip.device) for t in result))
