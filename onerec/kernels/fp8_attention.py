"""Cross-attention over the shared context with FP8 K/V (the recipe option attention="fp8").

The context K/V are computed once per request and read by every beam of the user at every step,
so they are quantized once (`quantize_context_kv`: one FP32 scale per user and KV head; called by the
model's context processor right after the K/V RMSNorms when its `quantize_kv` is set). The kernel then
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

`context_attention(q, kv, mask, kernel)` is the op (kernel torch | triton; `kernels.cross_attention`
calls it when the context K/V come quantized); `context_attention_reference` the same computation
in PyTorch (global instead of running max: the FP8 rounding of P differs slightly, well inside the
error budget of the tests); the Triton kernel is in onerec/kernels/triton_fp8_attention.py.
Layouts: q [B, N, H, dh] (N query rows per user; the cross_q GEMM output viewed, no transpose),
output [B, N, H, dh]; K/V [B, G, T, dh] with G KV heads (grouped-query when G < H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onerec.quant.fp8 import E4M3, E4M3_MAX, scale_from_amax

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
    q: torch.Tensor, kv: QuantizedContextKV, mask: torch.Tensor | None = None, kernel: str = "torch",
    splits: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh)) v over each user's context, FP8. q [B, N, H, dh] -> [B, N, H, dh].

    mask [B, T] bool (True = real position) or None (nothing padded). Triton only: `splits` of the
    keys (None: enough for ~2 waves), `config` block_m / block_n / num_warps / num_stages.
    """
    if kernel == "torch":
        return context_attention_reference(q, kv, mask)
    if kernel != "triton":
        raise ValueError(f"context_attention: kernel must be torch or triton, got {kernel!r}")
    from onerec.kernels import triton_fp8_attention

    return triton_fp8_attention.context_attention(q, kv, mask, splits, **(config or {}))


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


def merge_splits(part: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Partial outputs [S, ...,  dh] with log2-sum-exp2 [S, ...] -> the exact softmax over all keys."""
    weight = torch.softmax(lse2 * math.log(2.0), dim=0)  # exp(lse_s - logsumexp_s lse); empty splits get 0
    return (part * weight[..., None]).sum(0)
