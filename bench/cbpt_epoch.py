"""One CBPT prompt-tuning epoch on cached image features vs re-encoding the images every epoch.

    python -m bench.cbpt_epoch                  # lab BadNet model, 16-shot Fashion-MNIST
    python -m bench.cbpt_epoch --reps 5 --shots 4

CBPT's image encoder is frozen, so cbpt.tune caches the clean and dummy-triggered features once and each
epoch (one full-batch step) runs only the text side. The alternative timed here re-encodes both image
sets through the frozen encoder every epoch, then takes the same text-side step. Both are timed
round-robin in one run (median of interleaved repetitions), so the ratio is fair on a noisy machine.
Writes bench/results/cbpt_epoch.json and .md."""
import argparse
from pathlib import Path

import torch

from engine import data as D
from engine.defenses import cbpt
from engine.io import atomic_path, write_json
from engine.models import bundled_checkpoint, load_model

from .common import command, interleaved_medians, machine


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lab", default="badnet", help="bundled lab checkpoint")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--inv-steps", type=int, default=20,
                   help="trigger inversion steps for the dummy trigger (its values do not change the timing)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/results/cbpt_epoch")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    clip = load_model("lab-vit", checkpoint=bundled_checkpoint(args.lab), device=device)
    train_all = D.load_dataset("fashion-mnist", "train", clip.image_size)
    train = train_all.subset(D.few_shot_indices(train_all.labels, args.shots, 0))
    cfg = cbpt.CBPTConfig(inv_steps=args.inv_steps)
    mask, pattern, _ = cbpt.invert_trigger(clip, train.images, cfg)
    hand_text = clip.text_features(train.classes, D.DEFAULT_TEMPLATES)
    labels = train.labels.to(device)
    cached = cbpt.cache_features(clip, train.images, mask, pattern)

    def epoch(reencode):
        prompts = cbpt.ClassPrompts(clip, train.classes, cfg.ctx, cfg.init_std)
        opt = torch.optim.Adam(prompts.parameters(), lr=cfg.lr)

        def fn():
            feats = cbpt.cache_features(clip, train.images, mask, pattern) if reencode else cached
            cbpt.prompt_step(clip, prompts, opt, *feats, labels, hand_text, cfg)
        return fn

    med, raw = interleaved_medians({"cached": epoch(False), "reencode": epoch(True)}, args.reps, device=device)
    ratio = med["reencode"] / med["cached"]
    row = {"model": f"lab-vit ({args.lab})", "shots": args.shots, "images": len(train),
           "encoded_per_reencode_epoch": 2 * len(train), "median_s": med, "all_s": raw,
           "speedup_cached_vs_reencode": ratio}
    print(f"{len(train)} images: cached epoch {med['cached'] * 1000:.1f} ms, re-encode epoch "
          f"{med['reencode'] * 1000:.1f} ms -> cached is {ratio:.1f}x faster")
    write_json(args.out + ".json", {
        "benchmark": "one CBPT prompt-tuning epoch (full-batch text-side step), cached image features vs "
                     "re-encoding clean + dummy-triggered images each epoch; median of interleaved reps",
        "command": command("bench.cbpt_epoch", argv), "machine": machine(), "device": str(device),
        "reps": args.reps, "config": cfg.as_dict(), "results": [row]})
    md = ["| model | images | cached ms/epoch | re-encode ms/epoch | cached speed-up |", "|---|---|---|---|---|",
          f"| {row['model']}, {args.shots}-shot | {len(train)} (+{len(train)} triggered) | "
          f"{med['cached'] * 1000:.1f} | {med['reencode'] * 1000:.1f} | {ratio:.1f}x |"]
    with atomic_path(Path(args.out + ".md")) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
