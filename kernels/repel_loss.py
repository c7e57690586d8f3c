"""RVPT objective in one launch: L = mean_i CE(scale * cos(z_i, T), y_i) + alpha * L_FR.

L_FR = mean_i mean_p cos(c_ip, s_ip), or with a margin m: mean_i max(mean_p cos(c_ip, s_ip), m).
One program per sample computes its loss term AND the gradients w.r.t. c and z (Liger-Kernel
style): the forward stores dL/dc, dL/dz in fp32 and the backward only scales them by the incoming
scalar gradient. The K-way softmax over classes is an online softmax over blocks of the text matrix
that also accumulates sum_k softmax_k T_k (needed for dL/dz), so T is streamed once per sample.
Per-sample losses go to a (B,) buffer summed by torch: the result is bit-reproducible.
"""
import torch

import triton
import triton.language as tl

from . import _common
from ._common import INTERPRET, check_device, check_float_dtypes, check_tensors
from .reference import repel_ce_loss_reference  # noqa: F401  (the plain torch reference)

_COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity: each norm clamped at eps
_NORM_EPS = 1e-12  # torch.nn.functional.normalize


@triton.jit
def _repel_ce_kernel(C, S, Z, T, Y, LOSS, DC, DZ,
                     sc_b, sc_p, sc_w, ss_b, ss_p, ss_w, sz_b, sz_e, st_k, st_e,
                     P, W, E, K, logit_scale, ce_w, fr_w, margin,
                     HAS_MARGIN: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_K: tl.constexpr, COS_EPS: tl.constexpr, NORM_EPS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)

    # Feature repelling: fr = mean_p cos(c_p, s_p); d cos/dc = s/(|c||s|) - cos c/|c|^2.
    offs_w = tl.arange(0, BLOCK_W)
    w_mask = offs_w < W
    fr = 0.0
    for p in range(0, P):
        c = tl.load(C + i * sc_b + p * sc_p + offs_w * sc_w, mask=w_mask, other=0.0).to(tl.float32)
        s = tl.load(S + i * ss_b + p * ss_p + offs_w * ss_w, mask=w_mask, other=0.0).to(tl.float32)
        nc = tl.maximum(tl.sqrt(tl.sum(c * c, 0)), COS_EPS)
        ns = tl.maximum(tl.sqrt(tl.sum(s * s, 0)), COS_EPS)
        cos = tl.sum(c * s, 0) / (nc * ns)
        fr += cos
        dc = (s / ns - cos * c / nc) / nc
        tl.store(DC + (i * P + p) * W + offs_w, dc * (fr_w / P), mask=w_mask)
    fr = fr / P
    if HAS_MARGIN:
        # max(fr, m) has no gradient below the margin: overwrite this sample's dc with zeros.
        if fr < margin:
            for p in range(0, P):
                tl.store(DC + (i * P + p) * W + offs_w, tl.zeros([BLOCK_W], tl.float32), mask=w_mask)
        fr = tl.maximum(fr, margin)

    # Cross entropy over K classes on logits x_k = scale * <z/|z|, T_k>. The running max stays in
    # natural units so that ce = (m - x_y) + log(l) needs no base conversion of large numbers.
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    z = tl.load(Z + i * sz_b + offs_e * sz_e, mask=e_mask, other=0.0).to(tl.float32)
    nz = tl.maximum(tl.sqrt(tl.sum(z * z, 0)), NORM_EPS)
    zn = z / nz
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_E], tl.float32)  # sum_k exp(x_k - m) T_k, rescaled like l
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        t = tl.load(T + offs_k[:, None] * st_k + offs_e[None, :] * st_e,
                    mask=k_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
        x = tl.where(k_mask, tl.sum(t * zn[None, :], 1) * logit_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        corr = tl.exp2((m - m_new) * 1.4426950408889634)  # exp via exp2: log2(e) folded in
        e_x = tl.exp2((x - m_new) * 1.4426950408889634)
        l = l * corr + tl.sum(e_x, 0)
        acc = acc * corr + tl.sum(e_x[:, None] * t, 0)
        m = m_new
    y = tl.load(Y + i)
    t_y = tl.load(T + y * st_k + offs_e * st_e, mask=e_mask, other=0.0).to(tl.float32)
    ce = (m - logit_scale * tl.sum(t_y * zn, 0)) + tl.log(l)
    tl.store(LOSS + i, ce * ce_w + fr * fr_w)

    # dCE/dzn = scale * (sum_k softmax_k T_k - T_y); through the normalisation:
    # dz = (dzn - zn <zn, dzn>) / |z|.
    dzn = (acc / l - t_y) * (logit_scale * ce_w)
    dz = (dzn - zn * tl.sum(zn * dzn, 0)) / nz
    tl.store(DZ + i * E + offs_e, dz, mask=e_mask)


def _check(c, s, z, text, labels):
    names = ("c", "s", "z", "text", "labels")
    ts = (c, s, z, text, labels)
    check_tensors("repel_ce_loss", names, ts)
    if c.dim() != 3 or s.shape != c.shape:
        raise ValueError(f"repel_ce_loss: c and s must share one (B, P, W) shape; got {tuple(c.shape)}, {tuple(s.shape)}")
    B = c.shape[0]
    if z.dim() != 2 or z.shape[0] != B:
        raise ValueError(f"repel_ce_loss: z must be (B={B}, E); got {tuple(z.shape)}")
    if text.dim() != 2 or text.shape[1] != z.shape[1]:
        raise ValueError(f"repel_ce_loss: text must be (K, E={z.shape[1]}); got {tuple(text.shape)}")
    if labels.shape != (B,):
        raise ValueError(f"repel_ce_loss: labels must be (B={B},); got {tuple(labels.shape)}")
    if min(c.shape) == 0 or min(text.shape) == 0:
        raise ValueError(f"repel_ce_loss: empty input c {tuple(c.shape)}, text {tuple(text.shape)}")
    check_float_dtypes("repel_ce_loss", names[:4], ts[:4], same=False)
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"repel_ce_loss: labels must be int64 (or int32); got {labels.dtype}")
    check_device("repel_ce_loss", ts)


def _forward(c, s, z, text, logit_scale, labels, alpha, margin):
    B, P, W = c.shape
    K, E = text.shape
    dev = c.device
    loss = _common.empty((B,), torch.float32, dev)
    dc = _common.empty((B, P, W), torch.float32, dev)
    dz = _common.empty((B, E), torch.float32, dev)
    block_e = triton.next_power_of_2(E)
    # A (BLOCK_K, E) text tile of ~4K fp32 values per program keeps registers low on a GPU;
    # the interpreter prefers few, large steps.
    block_k = 32 if INTERPRET else max(1, min(64, 4096 // block_e))
    _repel_ce_kernel[(B,)](c, s, z, text, labels, loss, dc, dz,
                           *c.stride(), *s.stride(), *z.stride(), *text.stride(),
                           P, W, E, K, logit_scale, 1.0 / B, alpha / B,
                           0.0 if margin is None else float(margin),
                           HAS_MARGIN=margin is not None, BLOCK_W=triton.next_power_of_2(W),
                           BLOCK_E=block_e, BLOCK_K=block_k, COS_EPS=_COS_EPS, NORM_EPS=_NORM_EPS,
                           num_warps=4 if max(W, E) <= 1024 else 8)
    return loss.sum(), dc, dz


class RepelCELossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, s, z, text, logit_scale, labels, alpha, margin):
        loss, dc, dz = _forward(c, s, z, text, logit_scale, labels, alpha, margin)
        ctx.save_for_backward(dc, dz)
        ctx.dtypes = (c.dtype, z.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dc, dz = ctx.saved_tensors
        # grad is a 0-dim tensor: scaling on the device needs no host sync.
        return ((dc * grad).to(ctx.dtypes[0]), None, (dz * grad).to(ctx.dtypes[1]),
                None, None, None, None, None)


def repel_ce_loss(c, s, z, text, logit_scale, labels, alpha=2.0, margin=None):
    """mean_i CE(logit_scale * cos(z_i, text), labels_i) + alpha * L_FR(c, s) as a float32 scalar.
    c, s: (B, P, W) prompted / frozen class tokens; z: (B, E) image features (not normalised);
    text: (K, E) L2-normalised text features; logit_scale: float or 0-dim tensor (already exp'd).
    Gradients flow to c and z only; labels must lie in [0, K) (not checked: that would sync)."""
    _check(c, s, z, text, labels)
    logit_scale = float(logit_scale)  # a 0-dim CUDA tensor syncs once here
    return RepelCELossFunction.apply(c, s.detach(), z, text.detach(), logit_scale, labels,
                                     float(alpha), None if margin is None else float(margin))
