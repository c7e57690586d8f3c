"""One factory for every CLIP the engine touches: open_clip architectures (random weights, a
`pretrained` tag open_clip resolves, or a local checkpoint) and the lab architectures in
engine/model_configs/*.json, registered with open_clip so both go through the same code."""
import logging
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError
from .prompted_vit import frozen_forward, supports

CONFIG_DIR = Path(__file__).parent / "model_configs"
REPO_ROOT = Path(__file__).resolve().parent.parent
LAB_CHECKPOINTS = REPO_ROOT / "checkpoints" / "lab"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LAB_MEAN, LAB_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

_registered = False


def _register_lab_configs():
    global _registered
    if not _registered:
        import open_clip
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def is_lab(name):
    return name.startswith("lab-")


@dataclass
class Clip:
    """A frozen CLIP plus what is needed to feed it: tokenizer, image size, normalisation."""
    name: str
    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: tuple
    std: tuple

    @property
    def visual(self):
        return self.model.visual

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode_image(self, normalised):
        """Image features (N, E), unnormalised, of normalised images: the frozen tower. A ViT goes through
        the prompted path's own block code with no prompt (engine.prompted_vit.frozen_forward: the same
        numbers as open_clip's, and under --precision bf16 it avoids nn.MultiheadAttention's autocast path);
        other towers through open_clip."""
        visual = getattr(self.model, "visual", None)
        return frozen_forward(visual, normalised) if supports(visual) else self.model.encode_image(normalised)

    def normalise(self, images):
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def text_features(self, classes, templates):
        """(K, E) L2-normalised class embeddings, averaged over the templates (CLIP zero-shot)."""
        check_lab_words(self, classes, templates)
        feats = []
        for c in classes:
            tokens = self.tokenizer([t.format(c) for t in templates]).to(self.device)
            f = F.normalize(self.model.encode_text(tokens).float(), dim=-1).mean(0)
            feats.append(F.normalize(f, dim=-1))
        return torch.stack(feats)

    @property
    def logit_scale(self):
        return self.model.logit_scale.exp().item()


def check_lab_words(clip, classes, templates):
    """The lab CLIP's word-level tokenizer reads any word outside its caption vocabulary as <unk>: class
    names it does not know would all look alike and CA fall to chance without a word. Refuse them."""
    from .tokenizer import VOCAB, LabTokenizer
    if not isinstance(clip.tokenizer, LabTokenizer):
        return
    known = clip.tokenizer.index
    unknown, unread = {}, []  # word -> where it was seen ('' when it is a whole class name)
    for c in classes:
        words = re.findall(r"[a-z\-]+", c.lower())  # what LabTokenizer.encode reads; the rest it drops
        if not words:
            unread.append(c)
        for w in words:
            if w not in known:
                unknown.setdefault(w, "" if w == c else f" (in '{c}')")
    for t in templates:
        for w in re.findall(r"[a-z\-]+", t.replace("{}", " ").lower()):
            if w not in known:
                unknown.setdefault(w, f" (in template '{t}')")
    if not unknown and not unread:
        return
    what = []
    if unknown:
        what.append("it does not know " + ", ".join(f"'{w}'{where}" for w, where in unknown.items()))
    if unread:
        what.append("it reads no word of " + ", ".join(f"'{c}'" for c in unread))
    vocab = [w for w in VOCAB if not w.startswith("<")]
    raise UserError(f"{clip.name}'s word-level tokenizer would read these names as <unk> and classify by "
                    f"chance: {'; '.join(what)}. It knows only the lab captions' words ({', '.join(vocab)}); "
                    f"use an open_clip model (--model ViT-B-32 ...) for other class names")


def load_state_dict(path):
    """Tensors from a .safetensors or torch file; torch files are read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise UserError(f"cannot read checkpoint {path}: corrupt or not a checkpoint "
                            f"({str(e).strip().splitlines()[0]})") from e
        # torch's own text (7-9 lines) ends advising weights_only=False, which would run the file's code
        raise UserError(f"checkpoint {path} is not a plain tensor state dict (it holds pickled Python objects, "
                        f"which are not loaded: they could run code); convert it to safetensors") from e
    except Exception as e:  # safetensors and torch raise many types for a corrupt file
        raise UserError(f"cannot read checkpoint {path}: corrupt or not a checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint {path} holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record):
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _no_random_init_notice():
    """open_clip warns 'Model initialized randomly' on the root logger whenever it loads no weights of its
    own; where a checkpoint is loaded right after, that warning is false."""
    root, notice = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def load_model(name, pretrained=None, checkpoint=None, device="cpu"):
    """Build architecture `name`; weights from open_clip's `pretrained` tag or a local `checkpoint`."""
    import open_clip
    _register_lab_configs()
    if name not in open_clip.list_models():
        raise UserError(f"unknown model '{name}'; known: lab models {[m for m in open_clip.list_models() if is_lab(m)]} "
                        f"and open_clip architectures such as ViT-B-32, ViT-B-16 (see open_clip.list_models())")
    if pretrained and checkpoint:
        raise UserError("give either --pretrained or --checkpoint, not both")
    try:
        if checkpoint:  # open_clip loads nothing itself; the checkpoint follows
            with _no_random_init_notice():
                model = open_clip.create_model(name, pretrained=None, device="cpu")
        else:
            model = open_clip.create_model(name, pretrained=pretrained or None, device="cpu")
    except RuntimeError as e:
        raise UserError(f"cannot load pretrained weights '{pretrained}' for {name}: {e}") from e
    if checkpoint:
        sd = load_state_dict(checkpoint)
        own = model.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
        if missing or unexpected or wrong:
            detail = "; ".join(f"{what}: {keys[:3]}{'...' if len(keys) > 3 else ''}" for what, keys in
                               (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys)
            raise UserError(f"checkpoint {checkpoint} does not match architecture {name} ({detail})")
        model.load_state_dict({k: v.float() for k, v in sd.items()})
    model = model.to(device).eval().requires_grad_(False)
    if is_lab(name):
        from .tokenizer import LabTokenizer
        tokenizer, mean, std = LabTokenizer(), LAB_MEAN, LAB_STD
    else:
        tokenizer = open_clip.get_tokenizer(name)
        mean = tuple(getattr(model.visual, "image_mean", None) or OPENAI_MEAN)
        std = tuple(getattr(model.visual, "image_std", None) or OPENAI_STD)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Clip(name, model, tokenizer, int(size), mean, std)


def bundled_checkpoint(attack):
    """Path of the bundled lab checkpoint for `attack` ('clean' for the unpoisoned model)."""
    path = LAB_CHECKPOINTS / f"{attack}.safetensors"
    if not path.is_file():
        have = sorted(p.stem for p in LAB_CHECKPOINTS.glob("*.safetensors"))
        from . import manifest  # engine.manifest imports this module: import it here, not at the top
        entry = manifest.entry(attack)
        # the manifest keeps the recipe of models left out of the bundle (size budget, weak backdoor)
        how = f"build it with: {entry['command']}" if entry else "build one with python -m engine.lab"
        why = f" ({entry['note']})" if entry and entry.get("note") else ""
        raise UserError(f"no bundled lab checkpoint for attack '{attack}'{why}; have: {have}; "
                        f"{how}, or pass --checkpoint")
    return path
