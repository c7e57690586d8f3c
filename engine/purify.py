"""One function per defense for engine.tune: tune on the clean few shots, measure CA/ASR after, return a
runs.Tuned (numbers + what the run directory keeps). All share one signature:

    fn(args, job) -> runs.Tuned

`job` is engine.tune.Job (model, few shots, test set, trigger, target, hand-written classifier, backend);
`args` the engine.tune flags (--epochs and --lr override the defense's own defaults; for rvpt+cbpt they
apply to the RVPT stage)."""
import time
from dataclasses import replace

from . import prompted_vit
from .defenses import cbpt, cleanclip, linear_probe, repair, rvpt
from .evaluate import evaluate_attack
from .runs import Tuned


def _rvpt_config(args, alpha):
    return rvpt.default_config(args.model, start=args.prompt_start, tokens=args.prompt_tokens, alpha=alpha,
                               margin=args.margin, lr=args.lr, epochs=args.epochs, batch=args.batch,
                               seed=args.seed, augment=args.augment)


def _after(job, encode=None, classifier=None, clip=None):
    """CA/ASR/PA on the test set through the tuned encoder / classifier / model."""
    text = job.text if classifier is None else classifier
    return evaluate_attack(clip or job.clip, job.test, job.trigger, job.target, encode=encode, text=text)


def _prompted_encoder(job, prompts):
    """The tuned prompts' encoder for evaluation: `shared` for the naive backend (same numbers, faster)."""
    return prompted_vit.encoder(job.clip.visual, prompts, "shared" if job.backend == "naive" else job.backend)


def _tune_prompts(args, job, alpha):
    """(prompts, prompted encoder for evaluation, config, history, seconds)."""
    cfg = _rvpt_config(args, alpha)
    t0 = time.time()
    prompts, history = rvpt.tune(job.clip, job.train, job.text, cfg, job.backend, progress=not args.quiet)
    seconds = time.time() - t0
    return prompts, _prompted_encoder(job, prompts), cfg, history, seconds


def _visual_prompts(args, job, alpha):
    prompts, encode, cfg, history, seconds = _tune_prompts(args, job, alpha)
    return Tuned("rvpt" if alpha != 0 else "vpt", _after(job, encode), seconds, prompted_vit.parameter_count(prompts),
                 cfg.as_dict(), history, backend=job.backend, prompts=prompts, start=cfg.start)


def tune_rvpt(args, job):
    return _visual_prompts(args, job, args.alpha)


def tune_vpt(args, job):
    """Plain deep VPT: RVPT without the feature-repelling term (the ablation)."""
    return _visual_prompts(args, job, 0.0)


def _class_prompts(args, job, invert, encode=None, overrides=True):
    cfg = cbpt.default_config(lr=args.lr if overrides else None, epochs=args.epochs if overrides else None,
                              seed=args.seed, invert=invert)
    t0 = time.time()
    res = cbpt.tune(job.clip, job.train, job.text, cfg, progress=not args.quiet, encode=encode)
    return res, cfg, time.time() - t0


def _cbpt_tuned(name, res, cfg, seconds, after, **kw):
    extra = {}
    if res["mask"] is not None:
        extra = {"inversion_loss_history": [round(x, 5) for x in res["inversion_history"]],
                 "mask_mean": round(res["mask"].mean().item(), 5)}
    return Tuned(name, after, seconds, res["prompts"].ctx.numel(), cfg.as_dict(), res["history"],
                 classifier=res["text"], context=res["prompts"].ctx,
                 trigger=None if res["mask"] is None else (res["mask"], res["pattern"]), extra=extra, **kw)


def _text_prompts(args, job, invert):
    res, cfg, seconds = _class_prompts(args, job, invert)
    return _cbpt_tuned("cbpt" if invert else "coop", res, cfg, seconds, _after(job, classifier=res["text"]))


def tune_cbpt(args, job):
    return _text_prompts(args, job, invert=True)


def tune_coop(args, job):
    """CoOp: class-wise text prompts on clean CE only (CBPT without the inversion terms)."""
    return _text_prompts(args, job, invert=False)


def tune_rvpt_cbpt(args, job):
    """RVPT's visual prompts first, then CBPT on the prompted image encoder (inversion and cached
    features through the prompts); the run keeps both, and the export folds both."""
    prompts, encode, rcfg, rhist, rsec = _tune_prompts(args, job, args.alpha)
    res, ccfg, csec = _class_prompts(args, job, invert=True, encode=encode, overrides=False)
    tuned = _cbpt_tuned("rvpt+cbpt", res, ccfg, rsec + csec, _after(job, encode, res["text"]),
                        backend=job.backend, prompts=prompts, start=rcfg.start)
    tuned.tuned_params += prompted_vit.parameter_count(prompts)
    tuned.config = {"rvpt": rcfg.as_dict(), "cbpt": ccfg.as_dict()}
    tuned.history = rhist + res["history"]
    tuned.extra["rvpt_epochs"] = len(rhist)
    return tuned


def tune_linear_probe(args, job):
    cfg = linear_probe.default_config(lr=args.lr, epochs=args.epochs, seed=args.seed)
    t0 = time.time()
    weight, history = linear_probe.tune(job.clip, job.train, cfg, progress=not args.quiet)
    seconds = time.time() - t0
    return Tuned("linear-probe", _after(job, classifier=weight), seconds, weight.numel(), cfg.as_dict(), history,
                 classifier=weight)


def tune_cleanclip(args, job):
    cfg = cleanclip.default_config(args.model, lr=args.lr, epochs=args.epochs, seed=args.seed)
    t0 = time.time()
    tuned_clip, history = cleanclip.tune(job.clip, job.train, cfg, progress=not args.quiet)
    seconds = time.time() - t0
    # zero-shot through the fine-tuned text tower, with the run's templates
    classifier = tuned_clip.text_features(job.test.classes, job.templates)
    return Tuned("cleanclip", _after(job, classifier=classifier, clip=tuned_clip), seconds,
                 prompted_vit.parameter_count(tuned_clip.model), cfg.as_dict(), history, model=tuned_clip.model)


def tune_repair(args, job):
    """Detect (mask, stripe and warp inversions on the shots), then distil deep visual prompts so the dummy
    trigger stops working; nothing is tuned when the detector reads the model clean."""
    base = repair.RepairConfig()
    cfg = replace(base, seed=args.seed, lr=args.lr or base.lr, epochs=args.epochs or base.epochs, batch=args.batch,
                  augment=args.augment)
    t0 = time.time()
    res = repair.tune(job.clip, job.train, job.text, cfg, job.backend, progress=not args.quiet,
                      log=None if args.quiet else print, detection=job.detection)
    seconds = time.time() - t0
    found = res["detection"]
    extra = {"detection": {"verdict": found["verdict"], "flagged_by": found["flagged_by"],
                           "suspected_target": job.test.classes[found["suspected_target"]], "checks": found["checks"],
                           "mask": found["mask"], "stripes": found["stripes"], "warp": found["warp"]},
             "repaired": res["prompts"] is not None}
    if res["prompts"] is None:
        return Tuned("repair", _after(job), seconds, 0, cfg.as_dict(), [], extra=extra)
    return Tuned("repair", _after(job, _prompted_encoder(job, res["prompts"])), seconds,
                 prompted_vit.parameter_count(res["prompts"]), cfg.as_dict(),
                 res["history"], backend=job.backend, prompts=res["prompts"], start=cfg.start, extra=extra)


DEFENSES = {"rvpt": tune_rvpt, "vpt": tune_vpt, "cbpt": tune_cbpt, "coop": tune_coop,
            "rvpt+cbpt": tune_rvpt_cbpt, "linear-probe": tune_linear_probe, "cleanclip": tune_cleanclip,
            "repair": tune_repair}
