"""Scan a CLIP for a backdoor without knowing the trigger: invert one per class, then ask whether one
class is an outlier. Three trigger families are searched (engine.inversion.detect): a stamped mask +
pattern per class (Neural Cleanse style: a backdoor target needs a far smaller mask than the other
classes), faint 1-D stripes in four orientations (global periodic signals) and smooth bounded warps.

    python -m engine.scan                          # the bundled BadNet lab model
    python -m engine.scan --lab clean              # the clean lab model (should say clean)
    python -m engine.scan --checkpoint suspect.safetensors --shots 8
    python -m engine.scan --model ViT-B-32 --pretrained openai --dataset folder:/data/pets
    torchrun --nproc_per_node 2 -m engine.scan     # each rank inverts its share of the classes

The inversions run on the few clean shots, and the inverted triggers are measured on them (or, with
--holdout N, on N other clean images of the train split). The thresholds were chosen on the backdoor zoo's dev split
(bench/zoo.py); bench/results/zoo.md reports the scan on the test split. Prints a table; writes
scan.json, trigger.png (the suspected trigger) and triggers.safetensors (every inverted trigger) to --out (default runs/scan-<timestamp>), nothing
unless the whole scan succeeds.
"""
import argparse
import time
from dataclasses import replace
from datetime import datetime

import torch

from . import data as D
from . import distributed
from .cli import run_cli
from .errors import UserError
from .inversion import detect as det
from .io import atomic_dir, check_creatable, occupied, save_png, write_json
from .models import bundled_checkpoint, is_lab, load_model
from .job import resolve_device
from . import precision as P

# The inverted triggers are measured on the shots themselves by default, as the repair defense (which has
# only the shots) does: the thresholds were chosen that way. --holdout N measures on N other images.
HOLDOUT = 0


def split_shots(train_all, shots, holdout, seed):
    """(few-shot ImageSet, held-out ImageSet or None): `shots` per class, and up to `holdout` other images."""
    few_idx = D.few_shot_indices(train_all.labels, shots, seed)
    if holdout == 0:
        return train_all.subset(few_idx), None
    taken = set(few_idx)
    rest = [i for i in range(len(train_all)) if i not in taken]
    if not rest:
        raise UserError(f"--shots {shots} uses every training image; none left to measure the trigger on")
    g = torch.Generator().manual_seed(seed)
    picked = sorted(rest[i] for i in torch.randperm(len(rest), generator=g)[:holdout].tolist())
    return train_all.subset(few_idx), train_all.subset(picked)


def scan(clip, few, held, text, cfg=None, log=print, progress=False):
    """detect() with probe images `held` (None: the shots); the suspected target as a class name."""
    result = det.detect(clip, few, text, cfg or det.DetectConfig(), probe=held, progress=progress, log=log)
    result["suspected_target"] = few.classes[result["suspected_target"]]
    return result


def format_report(result, cfg):
    m, st = result["mask"], result["stripes"]
    by = f"  (flagged by the {result['flagged_by']} inversion)" if result["flagged_by"] else ""
    rows = [("verdict", result["verdict"] + by), ("suspected target", result["suspected_target"]),
            ("mask inversion", f"smallest mask: {m['target']}, {m['mask_size']:.1f} px"),
            ("mask anomaly", f"{m['anomaly_index']:.1f}  (>= {cfg.min_mask_anomaly} to flag)"),
            ("mask flip share", f"{m['target_share']:.2f}")]
    if st:
        rows += [("stripe inversion", f"suspects {st['target']} ({st['orientation']} stripes)"),
                 ("stripe share", f"{st['target_share']:.3f}  (>= {cfg.min_stripe_share} to flag)"),
                 ("stripe anomaly", f"{st['anomaly_index']:.1f}  (>= {cfg.min_stripe_anomaly} to flag)")]
    lines = [f"{k:<20}{v}" for k, v in rows]
    lines.append("mask sizes (px)     " + "  ".join(f"{c} {v:.0f}" for c, v in m["sizes"].items()))
    if "restart_sizes" in m:   # detect.recheck_mask: these classes' sizes above are means over the runs
        runs = {c: [m["first_run"]["sizes"][c], *r] for c, r in m["restart_sizes"].items()}
        lines.append("rechecked (px)      "
                     + "  ".join(f"{c} " + "/".join(f"{v:.0f}" for v in r) for c, r in runs.items()))
    if st:
        for o, sh in st["shares"].items():
            lines.append(f"{o + ' stripes':<19} " + "  ".join(f"{c} {s:.2f}" for c, s in sh.items()))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine.scan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model (default: the bundled BadNet lab model)")
    m.add_argument("--model", default="lab-vit", help="lab-vit or an open_clip architecture (ViT-B-32, ...)")
    m.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs its weights or a network)")
    m.add_argument("--checkpoint", default=None, help="local checkpoint (.safetensors or torch state dict)")
    m.add_argument("--lab", default=None, help="a bundled lab checkpoint by name: clean, badnet, blended, ...")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, folder:PATH or csv:PATH")
    d.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    d.add_argument("--shots", type=int, default=16, help="clean labelled images per class for the inversion")
    d.add_argument("--holdout", type=int, default=HOLDOUT, help="held-out train images the trigger is measured on")
    s = p.add_argument_group("inversion")
    s.add_argument("--steps", type=int, default=det.DetectConfig().mask.steps, help="mask inversion steps")
    s.add_argument("--recheck", type=int, default=det.DetectConfig().mask.recheck_top,
                   help="the classes with the smallest masks inverted again from more seeds and their sizes "
                        "averaged (0: one run)")
    s.add_argument("--stripe-steps", type=int, default=det.DetectConfig().stripes.steps,
                   help="stripe inversion steps (0 skips the stripe check)")
    s.add_argument("--warp-steps", type=int, default=det.DetectConfig().mask.warp_steps,
                   help="warp inversion steps (0 skips the warp check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--precision", default="fp32", choices=P.CHOICES,
                   help="the frozen model's weights and matmuls (engine.precision; the triggers stay fp32)")
    p.add_argument("--out", default=None, help="output directory (default runs/scan-<timestamp>); must not exist")
    p.add_argument("--quiet", action="store_true", help="only the final table")
    return p.parse_args(argv)


def resolve_checkpoint(args):
    """The checkpoint to load: --lab NAME, --checkpoint, or the bundled BadNet lab model by default."""
    if args.lab is not None:
        if args.checkpoint or args.pretrained:
            raise UserError("give --lab, --checkpoint or --pretrained, not several")
        if not is_lab(args.model):
            raise UserError(f"--lab names a bundled lab checkpoint; it needs a lab model, not --model {args.model}")
        return bundled_checkpoint(args.lab)
    if args.checkpoint is None and args.pretrained is None and is_lab(args.model):
        return bundled_checkpoint("badnet")
    return args.checkpoint


def check_args(args):
    if args.out and occupied(args.out):
        raise UserError(f"--out {args.out} already exists and is not empty")
    if args.out:
        check_creatable(args.out, "--out")
    if args.holdout < 0:
        raise UserError("--holdout must be 0 (measure on the shots) or more")
    for flag in ("shots", "steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.recheck < 0:
        raise UserError("--recheck must be 0 (one inversion run) or more")
    for flag in ("stripe_steps", "warp_steps"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be 0 (skip) or more")


def run(args):
    t0 = time.time()
    check_args(args)
    device = distributed.init(resolve_device(args.device))   # under torchrun: classes spread over the ranks
    main_rank = distributed.is_main()
    log = (lambda *a: None) if args.quiet or not main_rank else print
    out_dir = args.out or f"runs/scan-{datetime.now():%Y%m%d-%H%M%S}"
    checkpoint = resolve_checkpoint(args)
    clip = load_model(args.model, args.pretrained, checkpoint, device)
    train_all = D.load_dataset(args.dataset, "train", clip.image_size, args.data_dir)
    if len(train_all.classes) < 2:
        raise UserError(f"{args.dataset} has a single class {train_all.classes}: the scan looks for one class "
                        f"that a trigger sends other classes' images to, so it needs at least two")
    few, held = split_shots(train_all, args.shots, args.holdout, args.seed)
    text = clip.text_features(few.classes, D.DEFAULT_TEMPLATES)
    base = det.DetectConfig()
    cfg = replace(base, mask=replace(base.mask, steps=args.steps, seed=args.seed, recheck_top=args.recheck,
                                         warp_steps=max(args.warp_steps, 1)),
                  stripes=replace(base.stripes, steps=max(args.stripe_steps, 1), seed=args.seed),
                  use_stripes=args.stripe_steps > 0, use_warps=args.warp_steps > 0)
    log(f"scanning {args.model} ({checkpoint or args.pretrained or 'random weights'}) on {device}: "
        f"{len(few)} shots" + (f", {len(held)} held-out images" if held is not None else ""))
    precision = P.resolve(args.precision, device)
    with P.run(precision, device, clip.model):
        result = scan(clip, few, held, text, cfg, log, progress=not args.quiet and main_rank)
    report = {
        "verdict": result["verdict"], "suspected_target": result["suspected_target"],
        "flagged_by": result["flagged_by"], "checks": result["checks"],
        "mask": result["mask"], "stripes": result["stripes"], "warp": result["warp"],
        "thresholds": {k: v for k, v in cfg.as_dict().items() if k.startswith("min_")},
        "inversion": {"mask": cfg.mask.as_dict(), "stripes": cfg.stripes.as_dict() if cfg.use_stripes else None},
        "model": args.model, "checkpoint": str(checkpoint) if checkpoint else None, "pretrained": args.pretrained,
        "dataset": args.dataset, "classes": few.classes, "shots": args.shots, "holdout_images": 0 if held is None else len(held),
        "device": str(device), "precision": precision, "ranks": distributed.world(),
        "seconds": round(time.time() - t0, 2),
    }
    if not main_rank:   # every rank holds the same result; rank 0 writes it
        return report
    with atomic_dir(out_dir) as tmp:
        save_png(tmp / "trigger.png", result["trigger_image"])
        det.save_tensors(tmp / "triggers.safetensors", result)
        write_json(tmp / "scan.json", report)
    print(format_report(result, cfg))
    print(f"{report['seconds']:.0f} s; scan.json, trigger.png and triggers.safetensors in {out_dir}")
    return report


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
