"""Purify a (possibly backdoored) CLIP by prompt tuning on a few clean labelled images.

    python -m engine.tune --fused                       # the repair defense on the bundled BadNet lab model
    python -m engine.tune --defense rvpt --fused        # RVPT (the paper's defense)
    python -m engine.tune --attack blended --alpha 0    # plain deep VPT, the ablation
    python -m engine.tune --defense cbpt --attack sig   # CBPT (trigger inversion + class-wise text prompts)
    python -m engine.tune --model ViT-B-32 --pretrained openai --dataset folder:/data/pets \
        --attack badnet --target cat                    # a real CLIP and your own images

Prints CA/ASR before and after, writes results.json and what the defense tuned (engine/runs.py:
prompts.safetensors, classifier.safetensors or model.safetensors) to --out. Nothing is written to
--out unless the whole run succeeds.
"""
import argparse
import dataclasses
import sys
import time
from datetime import datetime


from . import distributed, prompted_vit, purify, runs
from . import precision as P
from .cli import run_cli
from .errors import UserError
from .evaluate import predict
from .io import atomic_dir, check_creatable, occupied, write_json
from .metrics import clean_accuracy
from .job import JobConfig, defend, measure, pick_backend, prepare, resolve_device, resolve_target  # noqa: F401
from .purify import DEFENSES
from .triggers import TRIGGERS


def format_table(rows):
    """rows: (label, {'ca', 'asr', 'pa'}) -> an aligned text table."""
    lines = [f"{'':<12}{'CA %':>8}{'ASR %':>8}{'PA %':>8}"]
    lines += [f"{label:<12}{r['ca']:>8.2f}{r['asr']:>8.2f}{r['pa']:>8.2f}" for label, r in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--defense", default="repair", choices=sorted(DEFENSES),
                   help="repair (default: detect the trigger, then distil visual prompts; the best on the zoo's dev "
                        "split), rvpt, cbpt, rvpt+cbpt, or a baseline: vpt (rvpt with alpha 0), coop (cbpt without "
                        "inversion), linear-probe, cleanclip; --epochs/--lr override each one's defaults")
    p.add_argument("--fused", action="store_true", help="fast path: Triton kernels on CUDA, shared torch path on CPU")
    p.add_argument("--backend", choices=prompted_vit.BACKENDS, default=None, help="force one prompted-ViT implementation")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="lab-vit", help="lab-vit or an open_clip architecture (ViT-B-32, ...)")
    m.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs its weights or a network)")
    m.add_argument("--checkpoint", default=None, help="local checkpoint (.safetensors or torch state dict)")
    d = p.add_argument_group("data and attack")
    d.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, folder:PATH or csv:PATH")
    d.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    d.add_argument("--attack", default="badnet", choices=sorted(TRIGGERS),
                   help="trigger used to measure ASR (and, for lab-vit, the bundled backdoored checkpoint)")
    d.add_argument("--target", default="bag", help="attack target class (name or index)")
    d.add_argument("--trigger-seed", type=int, default=0)
    d.add_argument("--trigger-spec", default=None,
                   help="measure ASR with this trigger instead of --attack's: a JSON spec (engine/triggers/spec.py) "
                        "or @FILE holding one, e.g. a backdoor zoo record")
    d.add_argument("--shots", type=int, default=16, help="clean labelled images per class")
    d.add_argument("--unlabelled", type=int, default=0,
                   help="extra clean train images without labels; the repair distils on them too (others ignore them)")
    d.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate on N test images only (Fashion-MNIST: the first N; folder/csv data: a "
                        "class-balanced seeded subset)")
    t = p.add_argument_group("tuning (defaults: docs/ALGORITHMS.md for real CLIP; each defense's LAB_DEFAULTS for lab-vit)")
    t.add_argument("--epochs", type=int, default=None, help="override the defense's epochs (steps for cbpt/coop)")
    t.add_argument("--lr", type=float, default=None, help="override the defense's learning rate")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--alpha", type=float, default=2.0, help="feature-repelling weight (0 = plain deep VPT)")
    t.add_argument("--margin", type=float, default=None)
    t.add_argument("--no-augment", dest="augment", action="store_false", help="tune on the few shots as they are")
    t.add_argument("--prompt-tokens", type=int, default=None, help="b, prompt tokens per block")
    t.add_argument("--prompt-start", type=int, default=None, help="D, unprompted leading blocks")
    t.add_argument("--keep-quantile", type=float, default=None,
                   help="repair: the gate's keep rule, a quantile in [0, 1) (0: off; default "
                        "engine.defenses.repair.RepairConfig's)")
    t.add_argument("--keep-weight", type=float, default=None,
                   help="repair: > 0: the gate's keep cut minimises the CA its prompts would cost the target "
                        "class's shots plus this weight x the stand-in triggers' ASR it would leave (0: the "
                        "--keep-quantile cut alone; default RepairConfig's)")
    t.add_argument("--keep-from", choices=["all", "flagged"], default=None,
                   help="repair: the stand-in triggers whose shots the keep cut reads: all, or the flagged "
                        "family's alone (default RepairConfig's)")
    t.add_argument("--keep-cap", type=float, default=None,
                   help="repair: the balanced keep cut at most this quantile of the target class's own shots' "
                        "cosines, in [0, 1] (0: off; default RepairConfig's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--precision", default="fp32", choices=P.CHOICES,
                   help="the frozen model: fp32; bf16 / fp16 (weight matrices stored in it, matmuls autocast; "
                        "prompts and losses stay fp32); auto = bf16 on CUDA sm80+ and AMX / AVX512-BF16 CPUs, "
                        "else fp32 (bench/results/tune_step.md, precision.md)")
    p.add_argument("--out", default=None, help="run directory (default runs/<timestamp>); must not exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def shots_accuracy(job, tuned=None):
    """CA % on the few tuning images: zero-shot (tuned=None), or through what the defense tuned."""
    clip, encode, text = job.clip, None, job.text
    if tuned is not None:
        clip, encode, text = purify.tuned_view(tuned, job.clip, job.text, job.test.classes, job.templates)
    return clean_accuracy(predict(clip, job.train.images, text, encode), job.train.labels)


def defense_config(args):
    """The --defense's config from the flags (engine.purify.config; flags left unset keep its defaults)."""
    cfg = purify.config(args.defense, args.model, epochs=args.epochs, lr=args.lr, batch=args.batch, seed=args.seed,
                        augment=args.augment, alpha=args.alpha, margin=args.margin, tokens=args.prompt_tokens,
                        start=args.prompt_start)
    gate = {k: v for k, v in (("keep_quantile", args.keep_quantile), ("keep_weight", args.keep_weight),
                              ("keep_from", args.keep_from), ("keep_cap", args.keep_cap)) if v is not None}
    return dataclasses.replace(cfg, **gate) if gate else cfg


# Tuning fits the few shots, so their CA should not fall far below zero-shot; when it does, the tuning
# diverged (--lr 1e9: CA 10% on 10 classes) although the loss stayed finite.
SHOTS_CA_DROP_WARN = 25.0  # percentage points


def divergence_warning(before, after, args):
    if after >= before - SHOTS_CA_DROP_WARN:
        return None
    lower = f"a lower --lr (now {args.lr:g})" if args.lr is not None else "a --lr below the defense's default"
    return (f"CA on the tuning images fell from {before:.1f}% (zero-shot) to {after:.1f}% after tuning: the "
            f"tuning likely diverged; try {lower}")


def run(args):
    t0 = time.time()
    out_dir = args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}"
    job = prepare(JobConfig.from_args(args))       # under torchrun: joins the process group
    main_rank = distributed.is_main()               # only rank 0 prints tables and writes the run directory
    clip, test, target, checkpoint = job.clip, job.test, job.target, job.checkpoint
    before = measure(job)
    shots_before = shots_accuracy(job)
    tuned = defend(job, args.defense, defense_config(args), progress=not args.quiet and main_rank,
                   log=None if args.quiet or not main_rank else print)
    shots_after = shots_accuracy(job, tuned)
    warning = divergence_warning(shots_before, shots_after, args)
    if warning and main_rank:
        print(f"warning: {warning}", file=sys.stderr)
    results = {
        "defense": tuned.defense,
        "model": args.model, "checkpoint": str(checkpoint) if checkpoint else None, "pretrained": args.pretrained,
        "dataset": args.dataset, "classes": test.classes,
        "attack": args.attack, "target": test.classes[target], "shots": args.shots, "backend": tuned.backend,
        "device": str(clip.device), "precision": {"tuning": job.tune_precision, "evaluation": job.eval_precision},
        "ranks": distributed.world(), "seconds": round(time.time() - t0, 2), "tune_seconds": round(tuned.seconds, 2),
        "before": before, "after": tuned.after,
        "tuned_params": tuned.tuned_params, "total_params": prompted_vit.parameter_count(clip.model),
        "config": tuned.config, "loss_history": [round(x, 5) for x in tuned.history],
        "test_images": len(test), "shots_ca": {"before": shots_before, "after": shots_after},
        "warnings": [warning] if warning else [], **tuned.extra,
        "gate": None if tuned.gate is None else test.classes[tuned.gate],   # prompts apply where frozen predicts it
    }
    meta = {"model": args.model, "checkpoint": results["checkpoint"], "pretrained": args.pretrained,
            "classes": test.classes, "templates": job.templates,
            "image_size": clip.image_size, "mean": list(clip.mean), "std": list(clip.std),
            "before": before, "after": tuned.after, "attack": args.attack, "target": test.classes[target],
            "defense": tuned.defense}
    if not main_rank:
        return results
    with atomic_dir(out_dir) as tmp:
        runs.write(tmp, tuned, meta)
        write_json(tmp / "results.json", results)
    print(format_table([("before", before), ("after", tuned.after)]))
    pct = 100.0 * results["tuned_params"] / results["total_params"]
    print(f"tuned {results['tuned_params']:,} of {results['total_params']:,} parameters ({pct:.2f}%) "
          f"in {tuned.seconds:.1f} s; results in {out_dir}/results.json")
    if results["gate"]:
        print(f"gated: the prompts answer where the frozen model predicts '{results['gate']}', the frozen model elsewhere")
    return results


def check_args(args):
    """Every flag that can be checked before any work (loading, tuning) starts."""
    for flag in ("shots", "batch", "epochs", "eval_limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be positive, not {args.lr}")
    for flag in ("keep_quantile", "keep_weight", "keep_from", "keep_cap"):
        if getattr(args, flag) is not None and args.defense != "repair":
            raise UserError(f"--{flag.replace('_', '-')} is the repair's gate rule; --defense {args.defense} has no gate")
    if args.keep_weight is not None and not args.keep_weight >= 0:
        raise UserError(f"--keep-weight must be 0 or more (0: off), not {args.keep_weight}")
    if args.keep_cap is not None and not 0 <= args.keep_cap <= 1:
        raise UserError(f"--keep-cap must be in [0, 1] (0: off), not {args.keep_cap}")
    if args.keep_quantile is not None and not 0 <= args.keep_quantile < 1:
        raise UserError(f"--keep-quantile must be in [0, 1) (0: off), not {args.keep_quantile}")
    P.resolve(args.precision, resolve_device(args.device))
    if args.out:
        if occupied(args.out):
            raise UserError(f"--out {args.out} already exists and is not empty")
        check_creatable(args.out, "--out")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    return run(args)


if __name__ == "__main__":
    run_cli(main)
