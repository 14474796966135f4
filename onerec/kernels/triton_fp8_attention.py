"""Triton kernel of the FP8 context attention (onerec/kernels/fp8_attention.py has the op, the
K/V quantization, the PyTorch reference and the split merge). Defined on first use (`_kernels()`),
not at import, so that tests can run it through Triton's CPU interpreter (see triton_fused_moe.py).
"""

from __future__ import annotations

import functools
import math

import torch

from onerec.kernels.fp8_attention import P_SCALE, QuantizedContextKV, merge_splits
from onerec.quant.fp8 import AMAX_MIN, E4M3_MAX


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


def context_attention(
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

