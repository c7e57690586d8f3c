"""The files of an engine.tune run directory, and how to read them back (export and benches do).

What a defense changes decides what its run keeps; every safetensors file carries the same metadata
(model spec, classes, templates, CA/ASR before and after) as JSON strings:
- prompts.safetensors     RVPT / VPT visual prompts (L - D, b, W); metadata 'start' = D and 'gate' = the
                          class index whose frozen predictions the prompts re-examine (the repair), or null;
                          'gate_keep' = the cosine above which the frozen answer stands there (or null)
- classifier.safetensors  a (K, E) matrix replacing the text features, logits = logit_scale * z @ C.t()
                          (CBPT / CoOp tuned class features, the linear probe's weights)
- model.safetensors       a whole fine-tuned CLIP (CleanCLIP)
- trigger.png             CBPT's inverted trigger (mask | pattern | mask * pattern)
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .io import atomic_path

PROMPTS = "prompts.safetensors"
CLASSIFIER = "classifier.safetensors"
WEIGHTS = "model.safetensors"
TRIGGER_PNG = "trigger.png"


@dataclass
class Tuned:
    """What one defense produced: the numbers for results.json and the tensors for the run directory."""
    defense: str
    after: dict
    seconds: float
    tuned_params: int
    config: dict
    history: list
    backend: str = "torch"
    prompts: object = None       # VisualPrompts
    start: int = None            # D of the prompts
    classifier: object = None    # (K, E) tensor
    context: object = None       # CBPT's (K, M, W) class-wise context, kept for inspection
    model: object = None         # a fine-tuned torch CLIP (whole-model defenses)
    trigger: tuple = None        # (mask, pattern) of an inverted trigger
    gate: int = None             # prompts apply only where the frozen model predicts this class (the repair)
    gate_keep: float = None      # ... and only where they move the feature further than this cosine allows
    extra: dict = field(default_factory=dict)


def _save(path, tensors, meta):
    """One safetensors file, written through engine.io: atomically, and with the umask's permissions like
    every other result file (safetensors alone writes 0600)."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})


def save_prompts(path, prompts, meta):
    _save(path, {"prompts": prompts.prompts}, meta)


def write(folder, tuned, meta):
    """Write the files `tuned` calls for into `folder` (engine.tune passes a temp dir, renamed later)."""
    folder = Path(folder)
    if tuned.prompts is not None:
        save_prompts(folder / PROMPTS, tuned.prompts, {**meta, "start": tuned.start, "gate": tuned.gate,
                                                          "gate_keep": tuned.gate_keep})
    if tuned.classifier is not None:
        extra = {} if tuned.context is None else {"context": tuned.context}
        _save(folder / CLASSIFIER, {"classifier": tuned.classifier, **extra}, meta)
    if tuned.model is not None:
        _save(folder / WEIGHTS, tuned.model.state_dict(), meta)  # as tuned: the recorded CA/ASR are of these
    if tuned.trigger is not None:
        from .defenses.cbpt import save_trigger_png
        save_trigger_png(folder / TRIGGER_PNG, *tuned.trigger)


def _load(path, key=None):
    """(tensor `key` or None, metadata) of one safetensors file, UserError if unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            return (None if key is None else f.get_tensor(key)), meta
    except FileNotFoundError as e:
        raise UserError(f"no {Path(path).name} at {path}") from e
    except Exception as e:
        raise UserError(f"cannot read {key or 'metadata'} from {path}: {e}") from e


def load_prompts(path):
    """(prompts tensor (L-D, b, W), metadata dict) from a run's prompts.safetensors."""
    return _load(path, "prompts")


@dataclass
class Run:
    """A run directory read back: whichever of prompts / classifier / weights it holds, and its metadata."""
    folder: Path
    meta: dict
    prompts: object = None
    classifier: object = None
    weights: Path = None

    @property
    def start(self):
        return int(self.meta["start"]) if self.prompts is not None else None

    @property
    def gate(self):
        return self.meta.get("gate") if self.prompts is not None else None

    @property
    def gate_keep(self):
        return self.meta.get("gate_keep") if self.gate is not None else None


def read(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run directory {folder} does not exist")
    run = Run(folder, {})
    if (folder / PROMPTS).is_file():
        run.prompts, run.meta = load_prompts(folder / PROMPTS)
    if (folder / CLASSIFIER).is_file():
        run.classifier, meta = _load(folder / CLASSIFIER, "classifier")
        run.meta = {**meta, **run.meta}
    if (folder / WEIGHTS).is_file():
        run.weights = folder / WEIGHTS
        run.meta = run.meta or _load(folder / WEIGHTS)[1]
    if run.prompts is None and run.classifier is None and run.weights is None:
        raise UserError(f"{folder} has no {PROMPTS}, {CLASSIFIER} or {WEIGHTS}: not an engine.tune run directory")
    need = ["model", "classes", "templates"] + (["start"] if run.prompts is not None else [])
    for key in need:
        if key not in run.meta:
            raise UserError(f"{folder} metadata lacks '{key}': not written by engine.tune")
    return run
