"""ONNX Runtime inference of an exported model (export.onnx): provider choice, metadata, preprocessing.

`OnnxClassifier` also quacks like engine.models.Clip where engine.evaluate needs it (`device`,
`normalise`), so CA/ASR through ONNX Runtime reuse engine.evaluate rather than a second copy."""
import json
from pathlib import Path

import numpy as np
import torch

from engine.data import load_image
from engine.errors import UserError
from engine.models import Clip

PROVIDERS = ("auto", "cpu", "cuda")


def gpu_usable():
    """ORT's CUDA provider can be listed (onnxruntime-gpu) on a machine without a usable GPU: ask torch."""
    return torch.cuda.is_available()


def choose_providers(want="auto"):
    """(providers list, one-line reason). CUDA only when ORT offers it AND a GPU is usable."""
    import onnxruntime as ort
    if want not in PROVIDERS:
        raise UserError(f"unknown provider '{want}'; choose from {PROVIDERS}")
    offered = "CUDAExecutionProvider" in ort.get_available_providers()
    if want == "cpu":
        return ["CPUExecutionProvider"], "CPU (asked for)"
    if offered and gpu_usable():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA (onnxruntime CUDA provider, GPU present)"
    why = "this onnxruntime has no CUDA provider (install onnxruntime-gpu)" if not offered else "no usable GPU"
    if want == "cuda":
        raise UserError(f"--provider cuda asked for, but {why}")
    return ["CPUExecutionProvider"], f"CPU ({why})"


def read_metadata(session):
    raw = session.get_modelmeta().custom_metadata_map
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v  # plain strings (paths, names) are stored as they are
    for key in ("classes", "image_size", "mean", "std"):
        if key not in meta:
            raise UserError(f"model metadata lacks '{key}': not exported by export.onnx")
    return meta


class OnnxClassifier:
    """An exported purified (or unprompted) CLIP: normalised images -> (logits, features)."""
    device = torch.device("cpu")  # inputs are handed over as CPU arrays, whatever the provider
    normalise = Clip.normalise    # the torch side's formula, with mean/std from the model's metadata

    def __init__(self, path, provider="auto", threads=None, spinning=True):
        import onnxruntime as ort
        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX model {path} does not exist")
        self.path = path
        providers, self.reason = choose_providers(provider)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not spinning:  # idle ORT threads busy-wait by default, stealing the CPU from whatever runs next
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types for a bad file
            raise UserError(f"cannot load ONNX model {path}: {e}") from e
        self.provider = self.session.get_providers()[0]
        if providers[0] != self.provider:  # ORT falls back silently when the CUDA libraries are missing
            self.reason = f"CPU (ORT could not start {providers[0]})"
        self.meta = read_metadata(self.session)
        self.classes = list(self.meta["classes"])
        self.image_size = int(self.meta["image_size"])
        self.mean, self.std = tuple(self.meta["mean"]), tuple(self.meta["std"])
        self.input = self.session.get_inputs()[0].name

    def run(self, x):
        """Normalised (N, 3, S, S) float32 (torch or numpy) -> (logits, features) numpy."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        logits, feats = self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})
        if not (np.isfinite(logits).all() and np.isfinite(feats).all()):
            what = "the input images" if not np.isfinite(x).all() else f"the model {self.path}"
            raise UserError(f"non-finite scores (nan/inf) for {int((~np.isfinite(logits)).any(1).sum())} of "
                            f"{len(logits)} images: {what} holds non-finite values; no score is served")
        return logits, feats

    def logits(self, x):
        return torch.from_numpy(self.run(x)[0])

    def preprocess(self, paths):
        """Image files -> normalised (N, 3, S, S): engine.data.load_image's resize + crop, then mean/std."""
        return self.normalise(torch.stack([load_image(p, self.image_size) for p in paths]))
