"""Attention of one prompted ViT block whose prompt keys/values are shared by every image.

o = softmax(q [k ; k_p]^T * scale) [v ; v_p] with q, k, v (B, H, N, d) and k_p, v_p (H, b, d).
The prompt K/V have no batch dimension: the kernels read them with batch stride 0, so the
concatenation [k ; k_p] (B copies of the prompt) is never materialised. One online softmax
(FlashAttention-2, base-2 exponentials with log2(e) folded into the scale) runs over the image key
blocks, then over the prompt key blocks. The backward recomputes P from the saved row log-sum-exp.
dk_p / dv_p are sums over the batch: by default (deterministic=True) every (image group, head, key
block) program writes its own fp32 partial sum and torch reduces them in a fixed order, and the forward
runs one pinned config instead of the autotuned one (bit-reproducible); deterministic=False adds the
partial sums with fp32 atomics instead (no partial buffer, summation order not fixed) and autotunes the
forward.
"""
import math

import torch

import triton
import triton.language as tl

from . import _common
from ._common import INTERPRET, check_device, check_float_dtypes, check_tensors, launch_first_fit, sm_count
from .reference import prompt_attention_reference  # noqa: F401  (the plain torch reference)


def _precision(dtype):
    # fp32 inputs: exact fp32 products, as torch's fp32 matmul (TF32 would lose ~3 digits).
    return "ieee" if dtype == torch.float32 else "tf32"


# Kernel configs as (BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter cannot benchmark
# configs and prefers few interpreted steps: one 32x32 config everywhere.
_INTERPRET_CONFIG = (32, 32, 4, 1)
_FWD_TUNED = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3)]


def _wide_fp32(block_d, dtype):
    """fp32 tiles of a head dim padded past 64 (d = 80 -> 128): each 64 x 128 tile is 32 KB, and
    pipelining two stages of them can exceed the shared memory of many GPUs."""
    return block_d > 64 and dtype == torch.float32


def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": _INTERPRET_CONFIG[0], "BLOCK_N": _INTERPRET_CONFIG[1]},
                              num_warps=_INTERPRET_CONFIG[2], num_stages=_INTERPRET_CONFIG[3])]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in _FWD_TUNED]


def _fwd_pinned(block_d, dtype):
    """The forward's configs with deterministic=True, preferred first: one fixed config (the autotuner's
    pick may change from run to run, and with it the summation order), smaller ones as fallbacks when it
    does not fit the device."""
    if INTERPRET:
        return [_INTERPRET_CONFIG]
    first = [(64, 64, 4, 1)] if _wide_fp32(block_d, dtype) else [(64, 64, 4, 2), (64, 64, 4, 1)]
    return first + [(64, 32, 4, 1), (32, 32, 4, 1)]


def _bwd_configs(block_d, dtype):
    """The backward kernels' configs, preferred first, smaller blocks / fewer stages after: the first that
    fits the device runs. Fixed, not autotuned: an autotuner would re-run the atomic variant and add its
    partial sums several times."""
    if INTERPRET:
        return [_INTERPRET_CONFIG]
    if block_d <= 64:
        return [(64, 64, 4, 2), (64, 64, 4, 1), (64, 32, 4, 1), (32, 32, 4, 1)]
    first = [(64, 64, 8, 1)] if _wide_fp32(block_d, dtype) else [(64, 64, 8, 2), (64, 64, 8, 1)]
    return first + [(32, 64, 4, 1), (32, 32, 4, 1)]


# The first config that fitted, per (pass, BLOCK_D, dtype, device): later calls start there.
_FITS = {}

# Programs wanted for the prompt dK/dV pass: about two per SM (264 on an H100's 132 SMs).
_PROGRAMS_PER_SM = 2
_INTERPRET_PROGRAMS = 3  # under the interpreter: a few, so that groups of several images are exercised


def _prompt_programs(device):
    sms = None if INTERPRET else sm_count(device)
    return _INTERPRET_PROGRAMS if sms is None else _PROGRAMS_PER_SM * sms


def _image_groups(B, programs_per_group, programs):
    """Images per program and number of groups for the prompt dK/dV pass, for about `programs`
    programs in all. One program per image would write B partial (H, b, d) sums (at N = 50 that
    traffic rivals the whole backward's); one per head would leave the GPU idle. Groups of images sit
    in between."""
    want = max(1, min(B, programs // max(1, programs_per_group)))
    imgs = triton.cdiv(B, want)
    return imgs, triton.cdiv(B, imgs)


@triton.jit
def _load_tile(base, offs_r, offs_c, stride_r, stride_c, n_rows, n_cols):
    mask = (offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols)
    return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _fwd_over_keys(acc, m_i, l_i, q, k_base, v_base, sk_n, sk_d, sv_n, sv_d, n_keys, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Online-softmax accumulation of one key source (image tokens or prompt tokens)."""
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_t = _load_tile(k_base, offs_d, offs_n, sk_d, sk_n, HEAD_DIM, n_keys)  # (D, BLOCK_N)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # log2 domain
        s = tl.where((offs_n < n_keys)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        corr = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, offs_d, sv_n, sv_d, n_keys, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * corr[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, KP, VP, O, LSE,
                sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                skp_h, skp_n, skp_d, svp_h, svp_n, svp_d, so_b, so_h, so_n, so_d,
                H, N, NP, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    hi = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + bi * sq_b + hi * sq_h, offs_m, offs_d, sq_n, sq_d, N, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _fwd_over_keys(acc, m_i, l_i, q, K + bi * sk_b + hi * sk_h, V + bi * sv_b + hi * sv_h,
                                   sk_n, sk_d, sv_n, sv_d, N, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    # Same prompt tile for every image: no batch offset.
    acc, m_i, l_i = _fwd_over_keys(acc, m_i, l_i, q, KP + hi * skp_h, VP + hi * svp_h,
                                   skp_n, skp_d, svp_n, svp_d, NP, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)

    acc = acc / l_i[:, None]
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    o_ptrs = O + bi * so_b + hi * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + pid_bh * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)  # base-2 LSE


# deterministic=False: the same kernel autotuned over _FWD_TUNED.
_fwd_kernel_tuned = triton.autotune(configs=_fwd_configs(), key=["N", "NP", "HEAD_DIM"])(_fwd_kernel)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, so_b, so_h, so_n, so_d, sdo_b, sdo_h, sdo_n, sdo_d, H, N,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d o_id * do_id, the row term of dS = P * (dP - delta)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    hi = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + bi * so_b + hi * so_h, offs_m, offs_d, so_n, so_d, N, HEAD_DIM).to(tl.float32)
    do = _load_tile(DO + bi * sdo_b + hi * sdo_h, offs_m, offs_d, sdo_n, sdo_d, N, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + pid_bh * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                     sdo_b, sdo_h, sdo_n, sdo_d, sdk_g, sdk_h, sdk_n, sdk_d,
                     B, H, N, NK, IMGS, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
    """dK, dV of one key block for one head and a group of IMGS images, looping over their queries.
    Image keys: IMGS = 1, the group is the image. Prompt keys (sk_b = sv_b = 0): the group's sum goes
    to partial DK[g] (fp32), or with ATOMIC is added into one (H, b, d) fp32 buffer (sdk_g = 0)."""
    pid_n = tl.program_id(0)
    pid_gh = tl.program_id(1)
    g = pid_gh // H
    hi = pid_gh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < NK
    # Loaded once per program: the image's own keys (IMGS = 1) or the batch-invariant prompt keys.
    b0 = g * IMGS
    k = _load_tile(K + b0 * sk_b + hi * sk_h, offs_n, offs_d, sk_n, sk_d, NK, HEAD_DIM)
    v = _load_tile(V + b0 * sv_b + hi * sv_h, offs_n, offs_d, sv_n, sv_d, NK, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for bi in range(b0, tl.minimum(b0 + IMGS, B)):
        q_base = Q + bi * sq_b + hi * sq_h
        do_base = DO + bi * sdo_b + hi * sdo_h
        row = (bi * H + hi) * N
        for start in range(0, N, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_mask = offs_m < N
            q = _load_tile(q_base, offs_m, offs_d, sq_n, sq_d, N, HEAD_DIM)
            do = _load_tile(do_base, offs_m, offs_d, sdo_n, sdo_d, N, HEAD_DIM)
            lse = tl.load(LSE + row + offs_m, mask=m_mask, other=0.0)
            delta = tl.load(DELTA + row + offs_m, mask=m_mask, other=0.0)
            # Transposed tiles (keys x queries): dK, dV accumulate without a transpose at the end.
            # Padded queries need no mask (q = dO = 0, lse = 0: p = 1 contributes 0). Padded keys
            # only reach their own, never stored, rows, but 0 - lse can overflow there: zero them.
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            p_t = tl.where(n_mask[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    dk = dk * sm_scale
    mask = n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    out = g * sdk_g + hi * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_d
    if ATOMIC:
        tl.atomic_add(DK + out, dk, mask=mask)
        tl.atomic_add(DV + out, dv, mask=mask)
    else:
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_over_keys(dq, q, do, lse, delta, k_base, v_base, sk_n, sk_d, sv_n, sv_d, n_keys, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_d, sk_n, sk_d, n_keys, HEAD_DIM)
        v = _load_tile(v_base, offs_n, offs_d, sv_n, sv_d, n_keys, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # Masked: a padded key (k = 0) against a very negative lse would give a huge p.
        p = tl.where((offs_n < n_keys)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, KP, VP, DO, LSE, DELTA, DQ,
                   sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                   skp_h, skp_n, skp_d, svp_h, svp_n, svp_d, sdo_b, sdo_h, sdo_n, sdo_d,
                   sdq_b, sdq_h, sdq_n, sdq_d,
                   H, N, NP, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    hi = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    q = _load_tile(Q + bi * sq_b + hi * sq_h, offs_m, offs_d, sq_n, sq_d, N, HEAD_DIM)
    do = _load_tile(DO + bi * sdo_b + hi * sdo_h, offs_m, offs_d, sdo_n, sdo_d, N, HEAD_DIM)
    lse = tl.load(LSE + pid_bh * N + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + pid_bh * N + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_over_keys(dq, q, do, lse, delta, K + bi * sk_b + hi * sk_h, V + bi * sv_b + hi * sv_h,
                       sk_n, sk_d, sv_n, sv_d, N, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_over_keys(dq, q, do, lse, delta, KP + hi * skp_h, VP + hi * svp_h,
                       skp_n, skp_d, svp_n, svp_d, NP, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    dq = dq * sm_scale
    mask = m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    ptrs = DQ + bi * sdq_b + hi * sdq_h + offs_m[:, None] * sdq_n + offs_d[None, :] * sdq_d
    tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=mask)


def _check(q, k, v, k_p, v_p):
    names, ts = ("q", "k", "v", "k_p", "v_p"), (q, k, v, k_p, v_p)
    check_tensors("prompt_attention", names, ts)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"prompt_attention: q, k, v must share one (B, H, N, d) shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, d = q.shape
    if k_p.dim() != 3 or k_p.shape != v_p.shape or k_p.shape[0] != H or k_p.shape[2] != d:
        raise ValueError(f"prompt_attention: k_p, v_p must be (H, b, d) = ({H}, b, {d}); got "
                         f"{tuple(k_p.shape)}, {tuple(v_p.shape)}")
    if min(B, H, N, d) == 0:
        raise ValueError(f"prompt_attention: empty input {tuple(q.shape)}")
    check_float_dtypes("prompt_attention", names, ts, same=True)
    check_device("prompt_attention", ts)


def _bnhd(B, H, N, d, dtype, device):
    """(B, H, N, d) view of (B, N, H, d) memory: the block's o.transpose(1, 2).reshape(B, N, H*d)
    after attention is then free (no copy)."""
    return _common.empty((B, N, H, d), dtype, device).transpose(1, 2)


def _block_d(d):
    return max(16, triton.next_power_of_2(d))


def _fits_key(pass_name, block_d, dtype, device):
    return pass_name, block_d, dtype, str(device)


def _forward_with(cfg, q, k, v, k_p, v_p, scale):
    """The forward with one (BLOCK_M, BLOCK_N, num_warps, num_stages) config, or the autotuned kernel for
    cfg=None; allocates (o, lse)."""
    B, H, N, d = q.shape
    o, lse = _bnhd(B, H, N, d, q.dtype, q.device), _common.empty((B, H, N), torch.float32, q.device)
    args = (q, k, v, k_p, v_p, o, lse, *q.stride(), *k.stride(), *v.stride(), *k_p.stride(), *v_p.stride(),
            *o.stride(), H, N, k_p.shape[1], scale * math.log2(math.e))
    common = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), PRECISION=_precision(q.dtype))
    if cfg is None:  # the autotuner skips configs that do not fit the device
        _fwd_kernel_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](*args, **common)
        return o, lse
    bm, bn, warps, stages = cfg
    _fwd_kernel[(triton.cdiv(N, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                                             **common)
    return o, lse


def _forward(q, k, v, k_p, v_p, scale, deterministic):
    if not deterministic:
        return _forward_with(None, q, k, v, k_p, v_p, scale)
    block_d = _block_d(q.shape[-1])
    return launch_first_fit(_fwd_pinned(block_d, q.dtype), lambda cfg: _forward_with(cfg, q, k, v, k_p, v_p, scale),
                            _FITS, _fits_key("fwd", block_d, q.dtype, q.device))


def _backward_with(cfg, do, q, k, v, k_p, v_p, o, lse, scale, deterministic, needs):
    """The backward with one (BLOCK_M, BLOCK_N, num_warps, num_stages) config; allocates every output."""
    B, H, N, d = q.shape
    NP = k_p.shape[1]
    dev = q.device
    block_d = _block_d(d)
    bm, bn, warps, stages = cfg
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, PRECISION=_precision(q.dtype))
    qk_scale = scale * math.log2(math.e)

    delta = _common.empty((B, H, N), torch.float32, dev)
    _bwd_delta_kernel[(triton.cdiv(N, bm), B * H)](o, do, delta, *o.stride(), *do.stride(), H, N,
                                                   HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, num_warps=warps)
    dq = dk = dv = dk_p = dv_p = None
    if needs[0]:
        dq = _bnhd(B, H, N, d, q.dtype, dev)
        _bwd_dq_kernel[(triton.cdiv(N, bm), B * H)](
            q, k, v, k_p, v_p, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(),
            *k_p.stride(), *v_p.stride(), *do.stride(), *dq.stride(), H, N, NP, qk_scale, scale,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)
    if needs[1] or needs[2]:
        dk = _bnhd(B, H, N, d, q.dtype, dev)
        dv = _bnhd(B, H, N, d, q.dtype, dev)
        _bwd_dkdv_kernel[(triton.cdiv(N, bn), B * H)](
            q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *dk.stride(), B, H, N, N, 1, qk_scale, scale,
            BLOCK_M=bm, BLOCK_N=bn, ATOMIC=False, num_warps=warps, num_stages=stages, **common)
    if needs[3] or needs[4]:
        imgs, groups = _image_groups(B, H * triton.cdiv(NP, bn), _prompt_programs(dev))
        if deterministic:  # per-group partials, then a fixed-order torch reduction over the groups
            part_k = _common.empty((groups, H, NP, d), torch.float32, dev)
            part_v = _common.empty((groups, H, NP, d), torch.float32, dev)
            out_strides = part_k.stride()
        else:  # atomics on the (H, b, d) sums: group stride 0
            part_k = torch.zeros((H, NP, d), dtype=torch.float32, device=dev)
            part_v = torch.zeros((H, NP, d), dtype=torch.float32, device=dev)
            out_strides = (0, *part_k.stride())
        _bwd_dkdv_kernel[(triton.cdiv(NP, bn), groups * H)](
            q, k_p, v_p, do, lse, delta, part_k, part_v, *q.stride(), 0, *k_p.stride(), 0, *v_p.stride(),
            *do.stride(), *out_strides, B, H, N, NP, imgs, qk_scale, scale,
            BLOCK_M=bm, BLOCK_N=bn, ATOMIC=not deterministic, num_warps=warps, num_stages=stages, **common)
        if deterministic:
            part_k, part_v = part_k.sum(0), part_v.sum(0)
        dk_p, dv_p = part_k.to(k_p.dtype), part_v.to(v_p.dtype)
    return dq, dk, dv, dk_p, dv_p


def _backward(do, q, k, v, k_p, v_p, o, lse, scale, deterministic, needs):
    block_d = _block_d(q.shape[-1])
    launch = lambda cfg: _backward_with(cfg, do, q, k, v, k_p, v_p, o, lse, scale, deterministic, needs)
    return launch_first_fit(_bwd_configs(block_d, q.dtype), launch, _FITS,
                            _fits_key("bwd", block_d, q.dtype, q.device))


class PromptAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_p, v_p, scale, deterministic):
        o, lse = _forward(q, k, v, k_p, v_p, scale, deterministic)
        ctx.save_for_backward(q, k, v, k_p, v_p, o, lse)
        ctx.scale, ctx.deterministic = scale, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, k_p, v_p, o, lse = ctx.saved_tensors
        grads = _backward(do, q, k, v, k_p, v_p, o, lse, ctx.scale, ctx.deterministic, ctx.needs_input_grad[:5])
        return (*grads, None, None)


def prompt_attention(q, k, v, k_p, v_p, scale=None, deterministic=True):
    """softmax(q [k; k_p]^T scale) [v; v_p]. q, k, v: (B, H, N, d); k_p, v_p: (H, b, d), shared by
    the batch. Any strides are accepted (e.g. views of a fused qkv projection); a unit stride on d is
    fastest. The output is a (B, H, N, d) view of (B, N, H, d) memory.
    deterministic=True (default): bit-reproducible on a given device (one pinned forward config, fixed-
    order prompt-gradient sums); False: autotuned forward, atomic prompt-gradient sums."""
    _check(q, k, v, k_p, v_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return PromptAttentionFunction.apply(q, k, v, k_p, v_p, scale, bool(deterministic))
