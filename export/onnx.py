"""Export a purified CLIP (a tuning run's prompts, folded) or the unprompted model to one ONNX file.

    python -m export.onnx --run runs/X                       # -> runs/X/model.onnx
    python -m export.onnx --run runs/X --out purified.onnx --checkpoint other.safetensors
    python -m export.onnx --unprompted --run runs/X --out nodefense.onnx   # same CLIP, no prompts
    python -m export.onnx --unprompted --model lab-vit --checkpoint checkpoints/lab/badnet.safetensors \
        --dataset fashion-mnist --out nodefense.onnx

The graph maps normalised images (N, 3, H, W) to logits (N, K) and L2-normalised features (N, E),
dynamic N. Prompt K/V and the text classifier are constants in it (export.folded). Metadata
(metadata_props) holds classes, image_size, mean, std and the source run's CA/ASR. The file appears
only when the export, onnx.checker and a check against torch on a fresh batch size all succeed.
"""
import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from engine import data as D
from engine.cli import run_cli
from engine.errors import UserError
from engine.io import atomic_path
from engine.models import load_model

from . import folded

INPUT, OUTPUTS = "images", ("logits", "features")
VERIFY_TOL = 1e-3  # an export bug gives O(1) errors; float reordering gives ~1e-6
PRECISIONS = ("fp32", "fp16", "int8")
# fp16 / int8 graphs differ from torch by rounding, not by bugs: their check is the features' cosine
LOW_PRECISION_MIN_COS = 0.99


def check_writable(path):
    """Fail before the (slow) export when `path` cannot be written; creates nothing. Returns the
    outermost missing folder (atomic_path will create it), or None."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name such as {path / 'model.onnx'}")
    parent, missing = path.parent, None
    while not parent.exists():
        parent, missing = parent.parent, parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {parent} is not a writable directory")
    return missing


def _remove_created(missing, path):
    """After a failure: remove the folders this export created for `path`, if they stayed empty."""
    folder = Path(path).parent
    while missing is not None and folder != missing.parent:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _dynamo_export(module, example, path, opset):
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
                      dynamic_shapes=({0: batch},), opset_version=opset, external_data=False, optimize=True)


def _legacy_export(module, example, path, opset):
    axes = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes=axes, opset_version=opset or 17, do_constant_folding=True)


def _to_onnx(module, example, path, exporter, opset):
    """Run the chosen exporter; 'auto' prefers dynamo and falls back to the legacy one, saying so."""
    if exporter in ("auto", "dynamo"):
        try:
            _dynamo_export(module, example, path, opset)
            return "dynamo"
        except Exception as e:
            if exporter == "dynamo":
                raise UserError(f"dynamo ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
            print(f"dynamo exporter failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  f"falling back to the legacy TorchScript exporter")
    _legacy_export(module, example, path, opset)
    return "legacy"


def metadata(source, exporter):
    """String key/values for metadata_props; lists and dicts as JSON (the C++ runner parses them)."""
    clip, info = source.clip, source.info
    meta = {"producer": "clip-purify export.onnx", "exporter": exporter,
            "kind": "prompted" if source.module.prompt_tokens else "unprompted",
            "classes": source.classes, "image_size": clip.image_size, "mean": list(clip.mean), "std": list(clip.std),
            "embed_dim": source.module.classifier.shape[1], "logit_scale": clip.logit_scale,
            "input": INPUT, "outputs": list(OUTPUTS), **info}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def check_finite(module, example):
    """Refuse a model with non-finite constants (a NaN prompt, a diverged classifier) or outputs: its
    export would pass every other check (NaN - NaN compares as no difference) and serve NaN scores."""
    for name, t in [*module.named_buffers(), *module.named_parameters()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            what = (f"block {name.removeprefix('prompt_kv_')}'s prompt K/V, from the prompts"
                    if name.startswith("prompt_kv_") else "the classifier" if name == "classifier" else f"weight {name}")
            raise UserError(f"the model holds non-finite values ({bad} of {t.numel()} in {what}): the run's "
                            f"prompts, classifier or weights are broken (a diverged tuning?); nothing written")
    with torch.no_grad():
        out = module(example)
    for name, o in zip(OUTPUTS, out):
        if not torch.isfinite(o).all():
            raise UserError(f"the model's {name} on a test batch are not finite (nan/inf); nothing written")


def _verify(module, path, size, precision="fp32"):
    """ORT vs the torch module on a batch size the exporter never saw (checks the dynamic batch too).
    fp32: max abs difference of both outputs <= VERIFY_TOL; fp16/int8: features' cosine >= LOW_PRECISION_MIN_COS.
    Returns the max abs difference (fp32) or the smallest cosine."""
    import onnxruntime as ort
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT: x.numpy()})
    with torch.no_grad():
        want = module(x)
    for name, g, w in zip(OUTPUTS, got, want):
        if not (torch.isfinite(w).all() and np.isfinite(g).all()):
            raise UserError(f"{name} are not finite (nan/inf) in {'torch' if not torch.isfinite(w).all() else 'ONNX Runtime'} "
                            f"on a test batch; nothing written")
    if precision != "fp32":
        cos = float(torch.nn.functional.cosine_similarity(torch.from_numpy(got[1]).float(), want[1], dim=-1).min())
        if not cos >= LOW_PRECISION_MIN_COS:
            raise UserError(f"the {precision} graph's features disagree with torch (min cosine {cos:.4f} < "
                            f"{LOW_PRECISION_MIN_COS}); nothing written")
        return cos
    diff = max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))
    if not diff <= VERIFY_TOL:  # also a NaN difference
        raise UserError(f"exported graph disagrees with torch (max abs diff {diff:.2e}); nothing written")
    return diff


def export(source, out, exporter="auto", opset=None, verify=True, precision="fp32"):
    """Write source.module to `out` atomically; returns a summary dict. precision: fp32, fp16 (weights and
    activations in half, inputs/outputs fp32; for the CUDA provider) or int8 (ONNX Runtime's graph
    pre-processing, then dynamic quantisation of the MatMul/Gemm weights, QInt8 per channel; activations
    quantised per batch at run time)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    missing = check_writable(out)
    try:
        return _export(source, out, exporter, opset, verify, precision)
    except BaseException:
        _remove_created(missing, out)
        raise


def _lower_precision(path, precision):
    """Rewrite the fp32 graph at `path` in place as fp16 or int8."""
    import onnx
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
        pre, q = path.with_name(path.name + ".pre"), path.with_name(path.name + ".int8")
        try:
            # ONNX Runtime's graph optimisations first (fused LayerNorm / GELU / attention leave the MatMuls
            # bare for the quantiser), then per-channel weights: much faster than quantising the raw graph
            # (bench.latency's INT8 rows measure it)
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
            quantize_dynamic(str(pre), str(q), weight_type=QuantType.QInt8, per_channel=True)
            q.replace(path)
        finally:
            pre.unlink(missing_ok=True)
            q.unlink(missing_ok=True)
    elif precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))


def _export(source, out, exporter, opset, verify, precision="fp32"):
    import onnx
    t0 = time.time()
    size = source.clip.image_size
    example = torch.randn(2, 3, size, size)  # batch 2: a batch of 1 would be specialised
    module = source.module.eval()
    check_finite(module, example)
    with torch.no_grad(), atomic_path(out) as tmp:
        used = _to_onnx(module, example, tmp, exporter, opset)
        model = onnx.load(str(tmp))
        del model.metadata_props[:]
        for k, v in metadata(source, used).items():
            model.metadata_props.add(key=k, value=v)
        model.metadata_props.add(key="precision", value=precision)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
        _lower_precision(Path(tmp), precision)
        diff = _verify(module, tmp, size, precision) if verify else None
        opset_used = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    key = "max_abs_diff" if precision == "fp32" else "min_feature_cosine"
    return {"path": str(out), "exporter": used, "opset": opset_used, key: diff, "precision": precision,
            "seconds": round(time.time() - t0, 1), "bytes": Path(out).stat().st_size}


def unprompted_source(args):
    """The no-defense model: from a run's CLIP (--run) or from --model/--checkpoint/--pretrained."""
    if args.run:
        return folded.from_run(args.run, args.model, args.checkpoint, args.pretrained, prompted=False)
    if not args.model:
        raise UserError("--unprompted needs --run, or --model with --classes or --dataset")
    clip = load_model(args.model, args.pretrained, args.checkpoint)
    if args.classes:
        classes = args.classes
    elif args.dataset:
        classes = D.load_dataset(args.dataset, "test", clip.image_size, args.data_dir, limit=1).classes
    else:
        raise UserError("--unprompted --model needs the class names: --classes A B ... or --dataset NAME")
    info = {"model": args.model, "checkpoint": args.checkpoint, "pretrained": args.pretrained,
            "templates": args.templates}
    if not args.checkpoint and not args.pretrained:
        print(f"note: {args.model} with random weights (no --checkpoint or --pretrained)")
    return folded.build(clip, classes, args.templates, info=info)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="engine.tune run directory (prompts.safetensors)")
    p.add_argument("--out", help="output .onnx (default RUN/model.onnx, or RUN/unprompted.onnx with --unprompted)")
    p.add_argument("--unprompted", action="store_true", help="export the CLIP without prompts (no defense)")
    p.add_argument("--model", help="override the run's architecture")
    p.add_argument("--checkpoint", help="override the run's checkpoint")
    p.add_argument("--pretrained", help="open_clip pretrained tag instead of a checkpoint")
    p.add_argument("--classes", nargs="+", help="class names (--unprompted without --run)")
    p.add_argument("--dataset", help="take class names from this data set (--unprompted without --run)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--templates", nargs="+", default=D.DEFAULT_TEMPLATES, help="text templates (without --run)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, >= 17)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32; fp16 (for the CUDA provider); int8 (ONNX Runtime dynamic quantisation, CPU)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.opset is not None and args.opset < 17:
        raise UserError("--opset must be at least 17 (LayerNormalization)")
    if not args.run and not args.unprompted:
        raise UserError("give --run RUN_DIR (purified model) or --unprompted (no-defense model)")
    out = args.out or (Path(args.run) / ("unprompted.onnx" if args.unprompted else "model.onnx") if args.run else None)
    if out is None:
        raise UserError("--unprompted without --run needs --out")
    check_writable(out)  # before loading anything
    if Path(out).is_file() or Path(out).is_symlink():
        raise UserError(f"{'--out ' if args.out else ''}{out} already exists; remove it or give another --out")
    source = unprompted_source(args) if args.unprompted else \
        folded.from_run(args.run, args.model, args.checkpoint, args.pretrained)
    res = export(source, out, args.exporter, args.opset, not args.no_verify, args.precision)
    m = source.module
    what = f"prompted (D={m.start}, b={m.prompt_tokens})" if m.prompt_tokens else "unprompted"
    check = "" if res.get("max_abs_diff") is None else f"; ORT vs torch max abs diff {res['max_abs_diff']:.1e}"
    if res.get("min_feature_cosine") is not None:
        check = f"; {args.precision}: ORT vs torch min feature cosine {res['min_feature_cosine']:.5f}"
    print(f"wrote {res['path']}: {source.info.get('model')} {what}, {len(source.classes)} classes, "
          f"{res['bytes'] / 1e6:.1f} MB, {res['exporter']} exporter, opset {res['opset']}, {res['seconds']} s{check}")
    return res


if __name__ == "__main__":
    run_cli(main)
