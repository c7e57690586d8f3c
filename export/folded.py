"""The deployable purified CLIP classifier as one plain-torch module, for export and benchmarks.

Everything that does not depend on the image is folded into constant buffers when it is built:
- each prompted block's prompt LayerNorm + K/V projection (prompted_vit.prompt_kv): the prompts are
  constants after tuning, so their K/V are too, and the prompt rows themselves are never computed;
- the text tower: one classifier matrix (K, E), already multiplied by CLIP's logit scale.
The forward is prompted_vit.shared_block (plain torch ops, exportable; the Triton kernels are not).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import prompted_vit, runs
from engine.errors import UserError
from engine.models import load_model


class FoldedClassifier(nn.Module):
    """Normalised images (N, 3, S, S) -> (logits (N, K), L2-normalised image features (N, E)).
    prompts=None gives the unprompted (no-defense) model through the same code path. gate=k (the repair's
    suspected target): the prompted answer only where the unprompted model predicts k, else the
    unprompted one (engine.purify.gated); both streams run from block D on. gate_keep: there too, the
    unprompted answer where the two features' cosine is at least this (engine.purify.keeps_frozen)."""

    def __init__(self, visual, classifier, logit_scale, prompts=None, start=None, gate=None, gate_keep=None):
        super().__init__()
        self.gate = None if prompts is None or gate is None else int(gate)
        self.gate_keep = None if self.gate is None or gate_keep is None else float(gate_keep)
        blocks = visual.transformer.resblocks
        self.visual = visual
        self.start = len(blocks) if prompts is None else int(start)
        if prompts is not None:
            check_prompt_shape(prompts, self.start, len(blocks), visual.transformer.width)
        with torch.no_grad():
            for i in range(self.start, len(blocks)):
                kv = prompted_vit.prompt_kv(blocks[i], prompts[i - self.start].to(classifier.device))
                self.register_buffer(f"prompt_kv_{i}", kv.float().contiguous())
            self.register_buffer("classifier", (classifier.float() * logit_scale).contiguous())
        # CLIP pools the class token: the last block needs that row only.
        self.cls_only = prompted_vit._cls_pooled(visual)

    @property
    def prompt_tokens(self):
        kv = getattr(self, f"prompt_kv_{self.start}", None)
        return 0 if kv is None else kv.shape[2]

    def forward(self, images):
        h = self.visual._embeds(images)
        if self.gate is None:
            z = self._features(h, prompted=True)
            return z @ self.classifier.t(), z
        h = self._features(h, prompted=False, stop=self.start)      # the blocks both streams share
        zp, zf = self._features(h, True, self.start), self._features(h, False, self.start)
        lp, lf = zp @ self.classifier.t(), zf @ self.classifier.t()
        pick = lf.argmax(1) == self.gate
        if self.gate_keep is not None:   # engine.purify.keeps_frozen, as ONNX can trace it
            pick = pick & ((zp * zf).sum(-1) < self.gate_keep)   # both L2-normalised
        pick = pick[:, None]
        return torch.where(pick, lp, lf), torch.where(pick, zp, zf)

    def _features(self, h, prompted, begin=0, stop=None):
        """Blocks begin..stop (stop None: to the end, then the head and L2 normalisation) on tokens h."""
        blocks = self.visual.transformer.resblocks
        last = len(blocks) - 1
        for i in range(begin, len(blocks) if stop is None else stop):
            kv = getattr(self, f"prompt_kv_{i}") if prompted and i >= self.start else None
            h = prompted_vit.shared_block(blocks[i], h, kv, cls_only=self.cls_only and i == last)
        return h if stop is not None else F.normalize(prompted_vit._head(self.visual, h), dim=-1)


def check_prompt_shape(prompts, start, layers, width):
    """Prompts must be (L - D, b, W) for this ViT, else a UserError naming both shapes."""
    want = f"({layers - start}, b, {width}) for a {layers}-block, width-{width} ViT with D={start}"
    if not 0 <= start < layers:
        raise UserError(f"prompt start D={start} does not fit a {layers}-block ViT")
    if prompts.dim() != 3 or prompts.shape[0] != layers - start or prompts.shape[2] != width:
        raise UserError(f"prompts of shape {tuple(prompts.shape)} do not match the model: expected {want}")


@dataclass
class Source:
    """A folded model plus what the exported file should record about where it came from."""
    module: FoldedClassifier
    clip: object
    classes: list
    info: dict = field(default_factory=dict)


def build(clip, classes, templates, prompts=None, start=None, info=None, classifier=None, gate=None, gate_keep=None):
    """classifier: a tuned (K, E) matrix (CBPT, linear probe); default the hand-written text features.
    gate: the class whose unprompted predictions the prompts re-examine (a repair run's); gate_keep: its
    cosine above which the unprompted answer stands."""
    text = clip.text_features(classes, templates) if classifier is None else classifier.to(clip.device)
    module = FoldedClassifier(clip.visual, text, clip.logit_scale, prompts, start, gate, gate_keep).eval()
    return Source(module, clip, list(classes), dict(info or {}))


def from_run(run_dir, model=None, checkpoint=None, pretrained=None, prompted=True):
    """Folded model of an engine.tune run (engine/runs.py): its prompts, tuned classifier and/or
    fine-tuned weights; model spec from its metadata unless overridden. prompted=False: the run's CLIP
    before the defense (no prompts, hand-written classifier, original weights), the no-defense comparison."""
    run = runs.read(run_dir)
    meta = run.meta
    model = model or meta["model"]
    if checkpoint is None and pretrained is None and model == meta["model"]:
        checkpoint, pretrained = meta.get("checkpoint"), meta.get("pretrained")  # another model: random weights
    same = (model, checkpoint, pretrained) == (meta["model"], meta.get("checkpoint"), meta.get("pretrained"))
    if prompted and run.weights is not None:
        if not same:
            raise UserError(f"{run_dir} holds a whole fine-tuned model; it cannot be applied to another model")
        checkpoint, pretrained = run.weights, None
    clip = load_model(model, pretrained, checkpoint)
    if prompted and run.prompts is not None:  # before the text tower runs: a mismatch is the likeliest error
        blocks = clip.visual.transformer.resblocks
        check_prompt_shape(run.prompts, run.start, len(blocks), clip.visual.transformer.width)
    # The run's CA/ASR describe the run's own weights only.
    results = (meta.get("after" if prompted else "before") or {}) if same else {}
    info = {"model": model, "checkpoint": str(checkpoint) if checkpoint else None, "pretrained": pretrained,
            "source_run": str(run_dir), "defense": meta.get("defense") if prompted else None,
            "attack": meta.get("attack"), "target": meta.get("target"),
            "templates": meta["templates"], "ca": results.get("ca"), "asr": results.get("asr"),
            "before": meta.get("before") if same else None, "after": meta.get("after") if same else None}
    if not prompted:
        return build(clip, meta["classes"], meta["templates"], info=info)
    if run.prompts is not None:
        info.update(prompt_start=run.start, prompt_tokens=int(run.prompts.shape[1]), gate=run.gate,
                    gate_keep=run.gate_keep)
    return build(clip, meta["classes"], meta["templates"], run.prompts, run.start, info, run.classifier, run.gate,
                 run.gate_keep)
