"""Classify images, or evaluate CA/ASR, with an exported model through ONNX Runtime.

    python -m export.predict model.onnx shoe.png bag.jpg --top-k 3
    python -m export.predict model.onnx --eval --dataset fashion-mnist --attack badnet --target bag --limit 1000

--eval reports CA, ASR and PA as engine.evaluate defines them, next to the numbers the source run
recorded (from the model's metadata)."""
import argparse
import time

import torch

from engine import data as D
from engine.cli import run_cli
from engine.errors import UserError
from engine.evaluate import evaluate_attack
from engine.triggers import TRIGGERS, make_trigger
from engine.job import resolve_target

from .runtime import PROVIDERS, OnnxClassifier


def evaluate(model, data, attack, target, trigger_seed=0):
    """engine.evaluate.evaluate_attack with ONNX Runtime as the encoder. The graph already ends in the
    classifier, so its logits go in as 'features' against an identity 'text' matrix: the argmax is the same."""
    trigger = make_trigger(attack, model.image_size, trigger_seed)
    eye = torch.eye(len(model.classes))
    return evaluate_attack(model, data, trigger, target, encode=model.logits, text=eye)


def top_k(model, paths, k):
    probs = torch.from_numpy(model.run(model.preprocess(paths))[0]).softmax(-1)
    k = min(k, len(model.classes))
    return [(path, [(model.classes[int(i)], float(p)) for p, i in zip(*probs[n].topk(k))]) for n, path in enumerate(paths)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an .onnx written by export.onnx")
    p.add_argument("images", nargs="*", help="image files to classify")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--provider", choices=PROVIDERS, default="auto")
    p.add_argument("--eval", action="store_true", help="CA/ASR on a data set instead of classifying files")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--attack", default=None, choices=sorted(TRIGGERS), help="default: the source run's")
    p.add_argument("--target", default=None, help="default: the source run's")
    p.add_argument("--trigger-seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N test images only")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.eval and not args.images:
        raise UserError("give image files to classify, or --eval")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, not {args.limit}")
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, not {args.top_k}")
    model = OnnxClassifier(args.model, args.provider)
    print(f"{args.model}: {model.meta.get('kind', '?')} {model.meta.get('model', '')}, "
          f"{len(model.classes)} classes, {model.image_size} px; provider {model.reason}")
    if not args.eval:
        for path, best in top_k(model, args.images, args.top_k):
            print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in best))
        return None
    attack = args.attack or model.meta.get("attack")
    target = args.target or model.meta.get("target")
    if not attack or not target:
        raise UserError("the model records no attack/target: pass --attack and --target")
    data = D.load_dataset(args.dataset, "test", model.image_size, args.data_dir, limit=args.limit)
    if data.classes != model.classes:
        raise UserError(f"data set classes {data.classes} differ from the model's {model.classes}")
    t = time.time()
    res = evaluate(model, data, attack, resolve_target(target, data.classes), args.trigger_seed)
    print(f"{len(data)} test images, attack {attack} -> '{target}', {time.time() - t:.1f} s")
    print(f"ONNX Runtime: CA {res['ca']:.2f}%  ASR {res['asr']:.2f}%  PA {res['pa']:.2f}%")
    if model.meta.get("ca") is not None:
        print(f"source run (torch, its own test set): CA {model.meta['ca']:.2f}%  ASR {model.meta['asr']:.2f}%")
    return res


if __name__ == "__main__":
    run_cli(main)
