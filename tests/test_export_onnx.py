"""The exported graph is the purified model: ONNX Runtime matches torch's prompted_vit (shared) + text
classifier, batch size is dynamic, prompts are folded into constants, metadata travels with the file,
and CA/ASR through ONNX Runtime equal torch's."""
import json

import numpy as np
import onnx
import pytest
import torch

from engine import data as D
from engine import prompted_vit
from engine.evaluate import evaluate_attack
from engine.models import load_model
from engine.triggers import make_trigger
from export import folded
from export import onnx as ex
from export import predict, runtime
from export.runtime import OnnxClassifier

from export_helpers import LAB, RECORDED, lab_export, lab_reference, scratch, torch_logits

TOL = 1e-4


def batch(clip, n, seed):
    return torch.randn(n, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [1, 7])
def test_lab_onnx_matches_torch(n):
    _, path, _ = lab_export()
    clip, vp, text = lab_reference()
    x = batch(clip, n, n)
    logits, feats = OnnxClassifier(path, "cpu").run(x)
    want_logits, want_feats = torch_logits(clip, vp, text, x)
    assert logits.shape == (n, 10) and feats.shape == (n, clip.model.text_projection.shape[1])
    assert np.abs(logits - want_logits.numpy()).max() <= TOL
    assert np.abs(feats - want_feats.numpy()).max() <= TOL
    # The prompts matter: without them the logits differ (random prompts with std 0.5).
    assert np.abs(logits - torch_logits(clip, None, text, x)[0].numpy()).max() > 100 * TOL


def test_unprompted_export_matches_encode_image():
    _, _, path = lab_export()
    clip, _, text = lab_reference()
    x = batch(clip, 5, 0)
    model = OnnxClassifier(path, "cpu")
    assert np.abs(model.run(x)[0] - torch_logits(clip, None, text, x)[0].numpy()).max() <= TOL
    assert model.meta["kind"] == "unprompted" and model.meta["ca"] == RECORDED["before"]["ca"]


def test_prompts_are_folded_and_metadata_recorded():
    run, path, _ = lab_export()
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic (dynamic) batch
    clip, vp, _ = lab_reference()
    layers = len(clip.visual.transformer.resblocks)
    # No raw prompt tensor in the graph, and no LayerNorm on prompt rows: ln_pre, ln_1/ln_2 per block, ln_post.
    inits = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer]
    for p in vp.prompts.detach().numpy():
        assert not any(a.shape == p.shape and np.allclose(a, p) for a in inits)
    assert sum(n.op_type == "LayerNormalization" for n in m.graph.node) == 2 * layers + 2
    # The precomputed prompt K/V are there: (H, b, d) per prompted block, K and V.
    heads = clip.visual.transformer.resblocks[0].attn.num_heads
    kv_shape = (heads, LAB["tokens"], clip.visual.transformer.width // heads)
    assert sum(a.size == np.prod(kv_shape) and a.shape[-2:] == kv_shape[-2:] for a in inits) == 2 * (layers - LAB["start"])
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["classes"]) == D.FASHION_CLASSES
    assert json.loads(meta["image_size"]) == clip.image_size
    assert json.loads(meta["mean"]) == list(clip.mean) and json.loads(meta["std"]) == list(clip.std)
    assert json.loads(meta["ca"]) == RECORDED["after"]["ca"] and json.loads(meta["asr"]) == RECORDED["after"]["asr"]
    assert meta["kind"] == "prompted" and meta["source_run"] == str(run)


def test_ca_asr_through_onnx_runtime_equal_torch():
    _, path, _ = lab_export()
    clip, vp, text = lab_reference()
    data = D.load_dataset("fashion-mnist", "test", clip.image_size, limit=500)
    target = data.classes.index("bag")
    want = evaluate_attack(clip, data, make_trigger("badnet", clip.image_size), target,
                           encode=prompted_vit.encoder(clip.visual, vp, "shared"), text=text)
    got = predict.evaluate(OnnxClassifier(path, "cpu"), data, "badnet", target)
    assert got == want


def test_predict_cli_top_k(tmp_path, capsys):
    from PIL import Image
    _, path, _ = lab_export()
    clip, vp, text = lab_reference()
    data = D.load_dataset("fashion-mnist", "test", clip.image_size, limit=3)
    files = []
    for i, img in enumerate(data.images):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(files[-1])
    predict.main([str(path), *map(str, files), "--top-k", "2"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(str(tmp_path))]
    x = clip.normalise(torch.stack([D.load_image(f, clip.image_size) for f in files]))
    best = torch_logits(clip, vp, text, x)[0].argmax(1)
    top1 = [line.split(": ", 1)[1].split(", ")[0].rsplit(" ", 1)[0] for line in lines]  # "ankle boot 0.412"
    assert top1 == [data.classes[i] for i in best]


def test_provider_choice(monkeypatch):
    import onnxruntime as ort
    assert runtime.choose_providers("cpu")[0] == ["CPUExecutionProvider"]
    # A listed CUDA provider is not enough: a GPU must be usable too.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "gpu_usable", lambda: False)
    providers, why = runtime.choose_providers("auto")
    assert providers == ["CPUExecutionProvider"] and "no usable GPU" in why
    with pytest.raises(ex.UserError, match="no usable GPU"):
        runtime.choose_providers("cuda")
    monkeypatch.setattr(runtime, "gpu_usable", lambda: True)
    assert runtime.choose_providers("auto")[0][0] == "CUDAExecutionProvider"


def test_vit_b32_onnx_matches_torch():
    """One small export of a random-weight ViT-B-32 (b=50, D=3 as in the paper), checked at batch 1 and 7."""
    clip = load_model("ViT-B-32")
    torch.manual_seed(0)
    vp = prompted_vit.VisualPrompts.for_visual(clip.visual, 3, 50, init_std=0.5)
    classes = ["cat", "dog", "car"]
    src = folded.build(clip, classes, D.DEFAULT_TEMPLATES, vp.prompts.detach(), 3)
    path = scratch() / "vit-b-32.onnx"
    ex.export(src, path, verify=False)
    model = OnnxClassifier(path, "cpu")
    text = clip.text_features(classes, D.DEFAULT_TEMPLATES)
    for n in (1, 7):
        x = batch(clip, n, n)
        want = torch_logits(clip, vp, text, x)[0].numpy()
        assert np.abs(model.run(x)[0] - want).max() <= TOL
    path.unlink()


def test_a_gated_repair_run_exports_both_streams(tmp_path):
    """A repair run's gate travels in the prompts' metadata: ONNX Runtime gives the prompted logits where
    the unprompted model predicts the gate class, the unprompted ones elsewhere."""
    from engine.runs import load_prompts, save_prompts
    run, _, _ = lab_export()
    prompts, meta = load_prompts(run / "prompts.safetensors")
    clip, vp, text = lab_reference()
    x = batch(clip, 16, 4)
    plain = torch_logits(clip, None, text, x)[0]
    k = int(plain.argmax(1).mode().values)
    gated_run = tmp_path / "gated"
    gated_run.mkdir()
    save_prompts(gated_run / "prompts.safetensors", vp, {**meta, "gate": k})
    ex.main(["--run", str(gated_run)])
    logits, _ = OnnxClassifier(gated_run / "model.onnx", "cpu").run(x)
    pick = (plain.argmax(1) == k).numpy()
    assert 0 < pick.sum() < len(x)
    assert np.abs(logits[pick] - torch_logits(clip, vp, text, x)[0].numpy()[pick]).max() <= TOL
    assert np.abs(logits[~pick] - plain.numpy()[~pick]).max() <= TOL
