"""Shared by tests/test_export_*.py: a small lab tuning-run directory and its ONNX export, made once per
test session (an export takes ~15 s on 2 cores), plus the torch reference they must agree with."""
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine import data as D
from engine import prompted_vit
from engine.errors import UserError
from engine.models import bundled_checkpoint, load_model
from engine.runs import load_prompts, save_prompts

ROOT = Path(__file__).resolve().parent.parent
LAB = dict(start=2, tokens=8)
RECORDED = {"before": {"ca": 71.5, "asr": 93.25, "pa": 7.0}, "after": {"ca": 70.25, "asr": 1.5, "pa": 68.0}}


def scratch():
    d = Path(tempfile.mkdtemp(prefix="clip-purify-export-test-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def lab_checkpoint(folder):
    """The bundled BadNet lab model when it exists, else random weights saved to `folder`."""
    try:
        return bundled_checkpoint("badnet")
    except UserError:
        clip = load_model("lab-vit")
        path = folder / "random-lab.safetensors"
        save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(path))
        return path


def make_run(folder, checkpoint, start=LAB["start"], tokens=LAB["tokens"], width=None, seed=0):
    """A run directory as engine.tune writes it (prompts + metadata), without the tuning."""
    clip = load_model("lab-vit", checkpoint=checkpoint)
    torch.manual_seed(seed)
    vp = prompted_vit.VisualPrompts.for_visual(clip.visual, start, tokens, init_std=0.5)
    if width is not None:  # a deliberately mismatched run
        vp = prompted_vit.VisualPrompts(width, len(clip.visual.transformer.resblocks), start, tokens)
    meta = {"model": "lab-vit", "checkpoint": str(checkpoint), "pretrained": None, "start": start,
            "classes": D.FASHION_CLASSES, "templates": D.DEFAULT_TEMPLATES, "image_size": clip.image_size,
            "mean": list(clip.mean), "std": list(clip.std), **RECORDED, "attack": "badnet", "target": "bag"}
    folder.mkdir(parents=True, exist_ok=True)
    save_prompts(folder / "prompts.safetensors", vp, meta)
    return folder


@functools.cache
def lab_export():
    """(run dir, model.onnx, unprompted.onnx) of one lab run, via the export CLI's main()."""
    from export import onnx as ex
    root = scratch()
    run = make_run(root / "run", lab_checkpoint(root))
    ex.main(["--run", str(run)])
    ex.main(["--run", str(run), "--unprompted"])
    return run, run / "model.onnx", run / "unprompted.onnx"


@functools.cache
def lab_reference():
    """The torch purified model of lab_export(): (clip, VisualPrompts, text features)."""
    run, _, _ = lab_export()
    prompts, meta = load_prompts(run / "prompts.safetensors")
    clip = load_model(meta["model"], checkpoint=meta["checkpoint"])
    vp = prompted_vit.VisualPrompts.for_visual(clip.visual, meta["start"], prompts.shape[1])
    vp.prompts.data.copy_(prompts)
    return clip, vp, clip.text_features(meta["classes"], meta["templates"])


def torch_logits(clip, prompts, text, x):
    """The purified model in torch: engine.prompted_vit's shared path + the zero-shot classifier."""
    with torch.no_grad():
        z = prompted_vit.forward(clip.visual, prompts, x, "shared")["feature"] if prompts is not None \
            else clip.model.encode_image(x)
        z = F.normalize(z, dim=-1)
        return clip.logit_scale * z @ text.t(), z


def tiny_onnx(path, classes=("bag", "coat"), size=8, nan=False):
    """A hand-built model in export.onnx's format (images -> logits, features; the metadata export.predict
    reads), without any export: logits = flatten(images) @ W, features = logits. nan=True puts a NaN in W.
    Returns W (the torch twin is flatten(x) @ W)."""
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((3 * size * size, len(classes))).astype(np.float32) * 0.01
    if nan:
        w[0, 0] = np.nan
    nodes = [helper.make_node("Flatten", ["images"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["logits"]),
             helper.make_node("Identity", ["logits"], ["features"])]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", len(classes)]) for n in ("logits", "features")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                            ["batch", 3, size, size])],
                              out, initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {"classes": list(classes), "image_size": size, "mean": [0.5] * 3, "std": [0.25] * 3,
                 "kind": "unprompted", "attack": "badnet", "target": classes[0]}.items():
        model.metadata_props.add(key=k, value=json.dumps(v))
    onnx.save(model, str(path))
    return torch.from_numpy(w)
