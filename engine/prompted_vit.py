"""Deep visual prompts on a frozen open_clip VisionTransformer, with three backends.

Blocks are numbered 1..L. Blocks 1..D see no prompts; for d = D..L-1 a learnable p_d (b, width) is
inserted after the class token, so block d+1 receives [c^d, p_d, e^d] and its prompt outputs are
discarded (docs/ALGORITHMS.md, "RVPT").

- `naive`: the reference. torch.cat the prompts into the token sequence and call open_clip's own block;
  the frozen pass (for the feature-repelling loss) is a second, independent forward.
- `shared`: the prompt-aware path. p_d is the same for every image, so LayerNorm(p_d) and its K/V are
  computed once per batch, and the prompt rows get no query, no attention output and no MLP. Blocks
  1..D run once for both the frozen and the prompted pass.
- `triton`: `shared` with the attention of every prompted block in kernels.prompt_attention (CUDA).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.reference import prompt_attention_reference as torch_prompt_attention  # torch only, no triton

from .errors import UserError

BACKENDS = ("naive", "shared", "triton")


class VisualPrompts(nn.Module):
    """p_d for d = D..L-1: one (b, width) prompt per prompted block, N(0, init_std^2)."""

    def __init__(self, width, layers, start, tokens, init_std=0.02):
        super().__init__()
        if not 0 <= start < layers:
            raise UserError(f"prompt start depth D={start} must be in [0, {layers - 1}] for a {layers}-block ViT")
        if tokens < 1:
            raise UserError(f"need at least one prompt token, got {tokens}")
        self.start = start
        self.prompts = nn.Parameter(torch.randn(layers - start, tokens, width) * init_std)

    @classmethod
    def for_visual(cls, visual, start, tokens, init_std=0.02):
        blocks = visual.transformer.resblocks
        return cls(visual.transformer.width, len(blocks), start, tokens, init_std)


def _attn_params(block):
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention):
        raise UserError(f"prompt-aware path supports open_clip blocks with nn.MultiheadAttention, "
                        f"got {type(attn).__name__}; use --backend naive")
    return attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, attn.num_heads


def _triton_prompt_attention(q, k, v, k_p, v_p, scale):
    from kernels.prompt_attention import prompt_attention  # imports triton: only on this path
    return prompt_attention(q, k, v, k_p, v_p, scale)


def prompt_kv(block, prompt):
    """LayerNorm and K/V projection of the prompt tokens (b, W) -> (2, H, b, d). Batch-invariant: once per
    batch while tuning, once at export time for deployment (export.folded stores it as a constant)."""
    w_in, b_in, _, heads = _attn_params(block)
    W = w_in.shape[1]
    return F.linear(block.ln_1(prompt), w_in[W:], b_in[W:]).view(-1, 2, heads, W // heads).permute(1, 2, 0, 3)


def shared_block(block, x, prompt, attend=torch_prompt_attention, cls_only=False):
    """One block on image tokens x (B, N, W), with the prompt (b, W) (or None) as extra keys/values.

    cls_only: compute the output of the class token alone (K/V still from every token). With token
    pooling only the class token leaves the last block, so its other rows are never needed."""
    w_in, b_in, out_proj, heads = _attn_params(block)
    B, N, W = x.shape
    hd = W // heads
    y = block.ln_1(x)
    kv = F.linear(y, w_in[W:], b_in[W:]).view(B, N, 2, heads, hd).permute(2, 0, 3, 1, 4)
    if cls_only:
        x, y = x[:, :1], y[:, :1]
    q = F.linear(y, w_in[:W], b_in[:W]).view(B, -1, heads, hd).transpose(1, 2)
    scale = 1.0 / math.sqrt(hd)
    if prompt is None:
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], scale=scale)
    else:
        # Once per batch, not once per image: LayerNorm and the K/V projection of the prompt tokens.
        # `prompt` may already be its (2, H, b, d) K/V, precomputed (export.folded).
        kv_p = prompt if prompt.dim() == 4 else prompt_kv(block, prompt)
        attend = torch_prompt_attention if cls_only else attend  # one query row: nothing to fuse
        o = attend(q, kv[0], kv[1], kv_p[0], kv_p[1], scale)
    x = x + block.ls_1(out_proj(o.transpose(1, 2).reshape(B, -1, W)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def naive_block(block, x, prompt):
    """Reference: [c, p, e] through open_clip's own block, prompt outputs dropped."""
    B = x.shape[0]
    full = torch.cat([x[:, :1], prompt.unsqueeze(0).expand(B, -1, -1), x[:, 1:]], dim=1)
    out = block(full)
    return torch.cat([out[:, :1], out[:, 1 + prompt.shape[0]:]], dim=1)


def _cls_pooled(visual):
    """True when the image feature depends on the class token alone (CLIP's token pooling)."""
    return visual.pool_type == "tok" and visual.attn_pool is None


def _head(visual, x):
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def forward(visual, prompts, images, backend="shared", with_frozen=False):
    """Prompted forward of normalised images. Returns a dict with
    - `feature`: the projected image feature z (B, E),
    - `cls`: prompted class tokens c^d for d = D+1..L (B, L-D, W),
    - `frozen_cls` (with_frozen): the frozen, unprompted model's class tokens at the same depths."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; choose from {BACKENDS}")
    blocks = visual.transformer.resblocks
    start = prompts.start
    h = visual._embeds(images)
    frozen_cls = None
    if backend == "naive":
        if with_frozen:
            with torch.no_grad():
                f, cls = h, []
                for i, blk in enumerate(blocks):
                    f = blk(f)
                    if i >= start:
                        cls.append(f[:, 0])
                frozen_cls = torch.stack(cls, 1)
        cls = []
        for i, blk in enumerate(blocks):
            h = blk(h) if i < start else naive_block(blk, h, prompts.prompts[i - start])
            if i >= start:
                cls.append(h[:, 0])
    else:
        attend = _triton_prompt_attention if backend == "triton" else torch_prompt_attention
        last = len(blocks) - 1
        cls_only = _cls_pooled(visual)
        with torch.no_grad():  # blocks 1..D: frozen, prompt-free, shared by both passes
            for blk in blocks[:start]:
                h = shared_block(blk, h, None)
            if with_frozen:
                f, fc = h, []
                for i in range(start, len(blocks)):
                    f = shared_block(blocks[i], f, None, cls_only=i == last and cls_only)
                    fc.append(f[:, 0])
                frozen_cls = torch.stack(fc, 1)
        cls = []
        for i in range(start, len(blocks)):
            h = shared_block(blocks[i], h, prompts.prompts[i - start], attend, cls_only=i == last and cls_only)
            cls.append(h[:, 0])
    out = {"feature": _head(visual, h), "cls": torch.stack(cls, 1)}
    if with_frozen:
        out["frozen_cls"] = frozen_cls
    return out


def supports(visual):
    """True for the towers shared_block runs: open_clip ViTs with packed attention projections."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return hasattr(visual, "_embeds") and blocks is not None and all(hasattr(b.attn, "in_proj_weight") for b in blocks)


def frozen_forward(visual, images):
    """The unprompted tower on normalised images through shared_block (one code path with the prompted
    forward): projected features (B, E). Under autocast it runs plain matmuls on contiguous activations,
    where open_clip's nn.MultiheadAttention batches its input projection over a copied weight (the cost
    bench/results/tune_step.json's bf16 rows measured)."""
    blocks = visual.transformer.resblocks
    last, cls_only = len(blocks) - 1, _cls_pooled(visual)
    h = visual._embeds(images)
    for i, blk in enumerate(blocks):
        h = shared_block(blk, h, None, cls_only=cls_only and i == last)
    return _head(visual, h)


def encoder(visual, prompts, backend="shared"):
    """A normalised-images -> features callable for evaluation (no frozen pass)."""
    if prompts is None:
        return (lambda x: frozen_forward(visual, x)) if supports(visual) else visual
    return lambda x: forward(visual, prompts, x, backend)["feature"]


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())
