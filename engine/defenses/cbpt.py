"""CBPT: Class-wise Backdoor Prompt Tuning (docs/ALGORITHMS.md, "CBPT"; the project's reconstruction).

1. Trigger inversion: a dummy trigger x' = (1 - m) x + m P, with m = sigmoid(mask logits) and
   P = sigmoid(pattern logits), optimised (frozen encoders) so that triggered images of different
   classes cluster together and away from the clean embeddings (InfoNCE) plus lambda * mean(m).
2. Class-wise text prompts (CoOp class-specific context): M learnable vectors per class after the
   start-of-text token, then the class-name tokens, ".", end-of-text; frozen text tower.
3. Tuning: CE on clean few-shot features + CE on dummy-triggered features with their TRUE labels +
   beta * mean_k (1 - cos(tuned text feature_k, hand-written prompt feature_k)). The image encoder is
   frozen, so both image feature sets are computed once and cached; each step runs only the text side.
The result is a (K, E) matrix of normalised class text features: the new zero-shot classifier."""
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..evaluate import features
from ..inversion.contrastive import inversion_loss, invert_trigger  # noqa: F401 (step 1; tests call both)
from ..inversion.targeted import stamp
from ..io import save_png
from . import descend

INIT_PROMPT = "a photo of a"
PLACEHOLDER = "x"  # one token in both the lab tokenizer (<unk>) and open_clip's BPE


@dataclass
class CBPTConfig:
    # trigger inversion
    inv_steps: int = 100
    inv_lr: float = 0.2
    inv_batch: int = 64
    tau: float = 0.07
    lam: float = 50.0          # L1 weight on the mask, chosen on the BadNet lab model (too large: mask -> 0)
    mask_init: float = -3.0    # initial mask logit (sigmoid(-3) ~ 0.05)
    # class-wise prompt tuning
    ctx: int = 4               # M context vectors per class; 4 -> initialised from "a photo of a"
    init_std: float = 0.02
    beta: float = 10.0         # weight of the 1 - cos regulariser towards the hand-written prompts
    optimizer: str = "adam"
    lr: float = 0.005
    epochs: int = 200          # full-batch steps over the cached features
    invert: bool = True        # False: no inversion, no triggered CE term = plain CoOp (the ablation)
    seed: int = 0

    def as_dict(self):
        return asdict(self)


def default_config(model_name=None, **overrides):
    """Defaults above; `overrides` that are None are ignored."""
    return CBPTConfig(**{k: v for k, v in overrides.items() if v is not None})


def save_trigger_png(path, mask, pattern, scale=None):
    """mask | pattern | mask * pattern side by side, written atomically."""
    m = mask.detach().cpu()[0].expand(3, -1, -1)
    p = pattern.detach().cpu()[0]
    save_png(path, torch.cat([m, p, m * p], dim=2), scale)   # (3, S, 3S)


# ---------------------------------------------------------------- class-wise text prompts

def _text_parts(model):
    """token_embedding, positional_embedding, transformer, ln_final, text_projection, attn_mask of an
    open_clip CLIP (text tower inlined) or CustomTextCLIP (model.text is a TextTransformer)."""
    t = getattr(model, "text", None)
    src = t if t is not None and hasattr(t, "token_embedding") else model
    mask = getattr(src, "attn_mask", None)
    return src.token_embedding, src.positional_embedding, src.transformer, src.ln_final, src.text_projection, mask


def class_token_ids(clip, classes, n_ctx):
    """(K, L) token ids of "x x ... x {class}." with n_ctx placeholders after start-of-text."""
    prefix = " ".join([PLACEHOLDER] * n_ctx)
    tokens = clip.tokenizer([f"{prefix} {c}." for c in classes]).to(clip.device)
    probe = clip.tokenizer([prefix]).to(clip.device)
    if int(probe[0].argmax()) != n_ctx + 1:  # sot + n_ctx placeholders, then eot
        raise UserError(f"the tokenizer of {clip.name} does not map '{PLACEHOLDER}' to one token")
    return tokens


def init_context(clip, n_classes, n_ctx, init_std=0.02, generator=None):
    """(K, M, W) context vectors: the token embeddings of "a photo of a" when M == 4, else N(0, std^2)."""
    tok_emb = _text_parts(clip.model)[0]
    width = tok_emb.weight.shape[1]
    if n_ctx == len(INIT_PROMPT.split()):
        ids = clip.tokenizer([INIT_PROMPT]).to(clip.device)
        with torch.no_grad():
            ctx = tok_emb(ids)[0, 1:1 + n_ctx].float()
        return ctx.unsqueeze(0).repeat(n_classes, 1, 1).clone()
    return torch.randn(n_classes, n_ctx, width, generator=generator).to(clip.device) * init_std


def encode_text_with_context(model, ctx, class_tokens):
    """Text features (K, E), unnormalised, of [sot][ctx_1..ctx_M][class tokens . eot]: class_tokens
    (K, L) are the ids of "x x .. x {class}." (class_token_ids) whose M placeholders are replaced by
    ctx (K, M, W). Mirrors open_clip's TextTransformer.forward / CLIP.encode_text."""
    tok_emb, pos_emb, transformer, ln_final, proj, attn_mask = _text_parts(model)
    n_ctx = ctx.shape[1]
    emb = tok_emb(class_tokens)
    x = torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + n_ctx:]], dim=1)
    x = x + pos_emb.to(x.dtype)
    x = transformer(x, attn_mask=attn_mask)
    x = ln_final(x)
    eot = class_tokens.argmax(dim=-1)  # end-of-text has the largest id in both tokenizers
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


class ClassPrompts(torch.nn.Module):
    """Per-class learnable context; forward() -> (K, E) normalised class text features."""

    def __init__(self, clip, classes, n_ctx=4, init_std=0.02, generator=None):
        super().__init__()
        self.model = [clip.model]  # a list: keep the frozen CLIP out of parameters() / state_dict()
        self.register_buffer("tokens", class_token_ids(clip, classes, n_ctx))
        self.ctx = torch.nn.Parameter(init_context(clip, len(classes), n_ctx, init_std, generator))

    def forward(self):
        return F.normalize(encode_text_with_context(self.model[0], self.ctx, self.tokens).float(), dim=-1)


# ---------------------------------------------------------------- tuning

@torch.no_grad()
def cache_features(clip, images, mask=None, pattern=None, batch=256, encode=None):
    """(clean, dummy-triggered) normalised image features, computed once with the frozen encoder;
    the triggered set is None without a mask (CoOp)."""
    clean = features(clip, images, encode, batch=batch)
    if mask is None:
        return clean, None

    def dummy_trigger(x):
        return stamp(x, mask.to(x), pattern.to(x))
    return clean, features(clip, images, encode, dummy_trigger, batch)


def cbpt_loss(text, clean_feats, trig_feats, labels, hand_text, logit_scale, beta):
    """CE clean + CE dummy-triggered (true labels; skipped when trig_feats is None) + beta * (1 - cos)."""
    loss = F.cross_entropy(logit_scale * clean_feats @ text.t(), labels)
    if trig_feats is not None:
        loss = loss + F.cross_entropy(logit_scale * trig_feats @ text.t(), labels)
    reg = (1 - F.cosine_similarity(text, hand_text, dim=-1)).mean()
    return loss + beta * reg


def tune_prompts(clip, classes, clean_feats, trig_feats, labels, hand_text, cfg, progress=False):
    """Tune class-wise context on cached features; returns (ClassPrompts, per-step losses)."""
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = ClassPrompts(clip, classes, cfg.ctx, cfg.init_std, g)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(prompts.parameters(), lr=cfg.lr)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(prompts.parameters(), lr=cfg.lr, momentum=0.9)
    else:
        raise UserError(f"unknown optimizer '{cfg.optimizer}' (adam or sgd)")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))
    labels = labels.to(clip.device)
    hand_text = hand_text.to(clip.device)
    history = []
    bar = tqdm(range(cfg.epochs), desc="cbpt prompts", file=sys.stderr, disable=not progress, mininterval=2)
    for step in bar:
        history.append(prompt_step(clip, prompts, opt, clean_feats, trig_feats, labels, hand_text, cfg, sched,
                                   where=f"step {step + 1}"))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    return prompts.requires_grad_(False), history


def prompt_step(clip, prompts, opt, clean_feats, trig_feats, labels, hand_text, cfg, sched=None, where="step"):
    """One full-batch text-side step (a CBPT epoch): the CBPT loss through the class prompts, one update."""
    loss = cbpt_loss(prompts(), clean_feats, trig_feats, labels, hand_text, clip.logit_scale, cfg.beta)
    return descend(loss, opt, sched, where=where, hint=f"lower --lr (now {cfg.lr}) or check the model and data")


def tune(clip, train, hand_text, cfg, progress=True, encode=None):
    """The whole defense on the few-shot ImageSet `train`. Returns a dict: text (K, E) tuned normalised
    class features, mask, pattern (None for CoOp), prompts (ClassPrompts), inversion/tuning loss
    histories. `encode`: the image encoder to defend (default the unprompted image tower)."""
    torch.manual_seed(cfg.seed)
    mask = pattern = None
    inv_hist = []
    if cfg.invert:
        mask, pattern, inv_hist = invert_trigger(clip, train.images, cfg, progress, encode)
    clean_feats, trig_feats = cache_features(clip, train.images, mask, pattern, encode=encode)
    prompts, hist = tune_prompts(clip, train.classes, clean_feats, trig_feats, train.labels, hand_text, cfg, progress)
    with torch.no_grad():
        text = prompts()
    return {"text": text, "mask": mask, "pattern": pattern, "prompts": prompts,
            "inversion_history": inv_hist, "history": hist}
