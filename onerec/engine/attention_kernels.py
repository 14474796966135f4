"""Cross-attention over the shared context with FP8 K/V (the recipe option attention="fp8").

The context K/V are computed once per request and read by every beam of the user at every step,
so they are quantized once (`quantize_context_kv`: one FP32 scale per user and KV head; called in
the engine right after the context K/V RMSNorms, before the first decoding step). The kernel then
runs many queries (a user's beams) against that one K/V:

- Q is quantized in the kernel, one scale per query row and head (it comes out of the cross_q GEMM);
- S = Q K^T in FP8 with FP32 accumulation, times the scales; online softmax in FP32 (exp2);
- P = exp(S - running max) in [0, 1] is scaled by 448 before the FP8 cast (so small probabilities
  stay normal numbers), PV in FP8 with FP32 accumulation, the 1/448 folded into V's scale;
- split-K over the context for occupancy (one user has heads x beams/BLOCK_M tiles, 56 for the 1b
  model at beam 512, for 132 SMs): each split writes its normalised partial output and its
  log-sum-exp, merged exactly afterwards (flash-decoding).

V is stored transposed ([dh, T], T padded to a multiple of 16): Hopper's FP8 tensor-core product
wants both operands K-major, and for PV the reduction runs over T.

`context_attention(q, kv, mask, kernel)` is the op (kernel auto | torch | triton);
`context_attention_reference` the same computation in PyTorch (global instead of running max: the
FP8 rounding of P differs slightly, well inside the error budget of the tests).
Layouts: q [B, N, H, dh] (N query rows per user; the cross_q GEMM output viewed, no transpose),
output [B, N, H, dh]; K/V [B, G, T, dh] with G KV heads (grouped-query when G < H).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onerec.quant.fp8 import AMAX_MIN, E4M3, E4M3_MAX, scale_from_amax

P_SCALE = E4M3_MAX  # probabilities in [0, 1] are cast to FP8 as p * 448
PAD = 16


@dataclass
class QuantizedContextKV:
    """One KV set of the context in FP8: k [B, G, Tp, dh], v_t [B, G, dh, Tp] (transposed), FP32 scales [B, G]."""

    k: torch.Tensor
    v_t: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    length: int  # T, the real context length (Tp >= T is padded with zeros)


def quantize_context_kv(k: torch.Tensor, v: torch.Tensor) -> QuantizedContextKV:
    """k, v [B, G, T, dh] (v may be k: tied K/V) -> FP8 with one FP32 scale per user and KV head."""
    B, G, T, dh = k.shape
    pad = -T % PAD

    def quantize(t):
        scale = scale_from_amax(t.abs().amax(dim=(2, 3)))
        q = (t.float() / scale[:, :, None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return F.pad(q.view(torch.uint8), (0, 0, 0, pad)).view(E4M3), scale

    kq, ks = quantize(k)
    vq, vs = (kq, ks) if v is k else quantize(v)
    return QuantizedContextKV(kq, vq.transpose(2, 3).contiguous(), ks, vs, T)


def context_attention(
    q: torch.Tensor, kv: QuantizedContextKV, mask: torch.Tensor | None = None, kernel: str = "auto",
    splits: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh)) v over each user's context, FP8. q [B, N, H, dh] -> [B, N, H, dh].

    mask [B, T] bool (True = real position) or None (nothing padded). Triton only: `splits` of the
    keys (None: enough for ~2 waves), `config` block_m / block_n / num_warps / num_stages.
    """
    if kernel == "auto":
        kernel = "triton" if q.is_cuda else "torch"
    if kernel == "torch":
        return context_attention_reference(q, kv, mask)
    if kernel != "triton":
        raise ValueError(f"context_attention: kernel must be auto, torch or triton, got {kernel!r}")
    return _triton_context_attention(q, kv, mask, splits, **(config or {}))


def context_attention_reference(q: torch.Tensor, kv: QuantizedContextKV, mask: torch.Tensor | None) -> torch.Tensor:
    """The FP8 computation in PyTorch: per-row-and-head Q scales, FP32 softmax, P cast as p * 448."""
    B, N, H, dh = q.shape
    T = kv.length
    G = kv.k.shape[1]
    qf = q.float()
    q_scale = scale_from_amax(qf.abs().amax(-1, keepdim=True))
    q_dq = (qf / q_scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * q_scale
    k = kv.k[:, :, :T].float() * kv.k_scale[:, :, None, None]
    v = kv.v_t[:, :, :, :T].transpose(2, 3).float() * kv.v_scale[:, :, None, None]
    k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)  # [B, H, T, dh]
    s = q_dq.transpose(1, 2) @ k.transpose(2, 3) / math.sqrt(dh)  # [B, H, N, T]
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p_fp8 = (p * P_SCALE).to(E4M3).float() / P_SCALE
    out = (p_fp8 @ v) / p.sum(-1, keepdim=True)
    return out.transpose(1, 2).to(q.dtype)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Float64 attention of the unquantized tensors (tests, GPU check): q [B, N, H, dh], k/v [B, G, T, dh]."""
    H, G = q.shape[2], k.shape[1]
    k, v = k.double().repeat_interleave(H // G, 1), v.double().repeat_interleave(H // G, 1)
    s = q.double().transpose(1, 2) @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Triton


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def attention_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, mask_ptr, o_ptr, lse_ptr,
        B, N, H, G, T, TP, keys_per_split, qk_scale,
        HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DH: tl.constexpr, FP8_MAX: tl.constexpr, SCALE_MIN: tl.constexpr, P_SCALE: tl.constexpr,
    ):
        # program (query tile, user * head, split): BLOCK_M query rows of one head over one key range
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        split = tl.program_id(2)
        b = (bh // H).to(tl.int64)
        h = bh % H
        g = (h // (H // G)).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        d = tl.arange(0, DH)
        q_off = ((b * N + rows[:, None]) * H + h) * DH + d[None, :]
        q = tl.load(q_ptr + q_off, mask=rmask[:, None], other=0.0).to(tl.float32)
        q_scale = tl.maximum(tl.max(tl.abs(q), axis=1), SCALE_MIN) / FP8_MAX
        q8 = tl.clamp(q / q_scale[:, None], -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        kv_head = b * G + g
        # exp2 domain: log2(e) / sqrt(dh) and the Q, K scales in one factor per row
        s_scale = q_scale * tl.load(ks_ptr + kv_head) * qk_scale
        k_base = k_ptr + kv_head * TP * DH
        v_base = v_ptr + kv_head * DH * TP
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, T)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, DH), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            valid = cols < end
            k = tl.load(k_base + cols[None, :] * DH + d[:, None], mask=valid[None, :], other=0.0)  # [DH, BN]
            s = tl.dot(q8, k) * s_scale[:, None]
            if HAS_MASK:
                valid &= tl.load(mask_ptr + b * T + cols, mask=valid, other=0) != 0
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key yet
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + d[None, :] * TP + cols[:, None], mask=valid[:, None], other=0.0)  # [BN, DH]
            acc = acc * alpha[:, None] + tl.dot((p * P_SCALE).to(tl.float8e4nv), v)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc * (tl.load(vs_ptr + kv_head) / P_SCALE) / l_safe[:, None]
        if SPLIT:  # partial output [splits, B, N, H, DH] fp32 and its log2-sum-exp2 [splits, B, N, H]
            base = ((split.to(tl.int64) * B + b) * N + rows) * H + h
            tl.store(o_ptr + base[:, None] * DH + d[None, :], out, mask=rmask[:, None])
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(lse_ptr + base, lse, mask=rmask)
        else:
            tl.store(o_ptr + q_off, out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])

    return triton, attention_kernel


def default_splits(tiles: int, T: int, sms: int = 132) -> int:
    """Enough key splits for ~2 waves of programs, each split at least 256 keys."""
    return max(1, min(-(-2 * sms // tiles), T // 256))


def _triton_context_attention(
    q, kv: QuantizedContextKV, mask, splits, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
    num_stages: int = 2,
):
    triton, kernel = _kernels()
    B, N, H, dh = q.shape
    G, TP, T = kv.k.shape[1], kv.k.shape[2], kv.length
    q = q.contiguous()
    tiles = triton.cdiv(N, block_m) * B * H
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        splits = default_splits(tiles, T, sms)
    keys_per_split = -(-T // splits)
    keys_per_split = -(-keys_per_split // block_n) * block_n
    splits = -(-T // keys_per_split)
    grid = (triton.cdiv(N, block_m), B * H, splits)
    has_mask = mask is not None
    mask_arg = mask.view(torch.uint8) if has_mask else q
    common = dict(
        HAS_MASK=has_mask, SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n, DH=dh,
        FP8_MAX=E4M3_MAX, SCALE_MIN=AMAX_MIN, P_SCALE=P_SCALE, num_warps=num_warps, num_stages=num_stages,
    )
    qk_scale = math.log2(math.e) / math.sqrt(dh)
    if splits == 1:
        out = torch.empty_like(q)
        kernel[grid](q, kv.k, kv.v_t, kv.k_scale, kv.v_scale, mask_arg, out, q, B, N, H, G, T, TP, keys_per_split,
                     qk_scale, **common)
        return out
    part = torch.empty(splits, B, N, H, dh, dtype=torch.float32, device=q.device)
    lse = torch.empty(splits, B, N, H, dtype=torch.float32, device=q.device)
    kernel[grid](q, kv.k, kv.v_t, kv.k_scale, kv.v_scale, mask_arg, part, lse, B, N, H, G, T, TP, keys_per_split,
                 qk_scale, **common)
    return merge_splits(part, lse).to(q.dtype)


def merge_splits(part: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Partial outputs [S, ...,  dh] with log2-sum-exp2 [S, ...] -> the exact softmax over all keys."""
    weight = torch.softmax(lse2 * math.log(2.0), dim=0)  # exp(lse_s - logsumexp_s lse); empty splits get 0
    return (part * weight[..., None]).sum(0)
