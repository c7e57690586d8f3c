"""The lab CLIP's word-level tokenizer: a fixed vocabulary of caption words (CLIP's 49k-token BPE
embedding would dominate a small text tower). Real CLIP models use open_clip's own tokenizer."""
import re

import torch

from .data import COLOUR_NAMES, FASHION_CLASSES

# Caption templates used to pre-train the lab CLIP. {c} class, {fg} item colour, {bg} background colour.
CLASS_TEMPLATES = ["a photo of a {c}.", "a {c}.", "a picture of a {c}.", "an image of a {c}."]
ATTRIBUTE_TEMPLATES = [
    "a photo of a {fg} {c}.",
    "a {c} on a {bg} background.",
    "a photo of a {fg} {c} on a {bg} background.",
    "a {fg} {c} in front of a {bg} background.",
    "a picture of a {c} in {fg}.",
]

_WORDS = sorted({w for t in CLASS_TEMPLATES + ATTRIBUTE_TEMPLATES
                 for w in re.findall(r"[a-z\-]+", t.replace("{c}", "").replace("{fg}", "").replace("{bg}", ""))}
                | {w for c in FASHION_CLASSES for w in c.split()} | set(COLOUR_NAMES))
# pad first (id 0, open_clip's pad_id); end-of-text last: open_clip pools the text tower at argmax(id).
VOCAB = ["<pad>"] + _WORDS + ["<unk>", "<sot>", "<eot>"]
CONTEXT_LENGTH = 16


class LabTokenizer:
    def __init__(self, context_length=CONTEXT_LENGTH):
        self.context_length = context_length
        self.index = {w: i for i, w in enumerate(VOCAB)}

    def encode(self, text):
        words = re.findall(r"[a-z\-]+", text.lower())
        ids = [self.index["<sot>"]] + [self.index.get(w, self.index["<unk>"]) for w in words]
        ids = ids[: self.context_length - 1] + [self.index["<eot>"]]
        return ids + [0] * (self.context_length - len(ids))

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)
