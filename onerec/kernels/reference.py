"""PyTorch references of the serving ops (any device): what the Triton kernels must compute.

Same rounding as the unfused model ops: RMSNorm in fp32 with the output rounded to the model
dtype, then `onerec.quant.fp8.quantize_per_token` where an FP8 GEMM follows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from onerec.quant.fp8 import quantize_per_token


class QuantizedRows(NamedTuple):
    """An activation already in FP8 for the GEMM that reads it: data [..., K] E4M3, scale [..., 1] fp32."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


# CUDA attention kernels put the batch (x heads) on a grid dimension that caps out near 2**16:
# at 2**16 or more sequences (e.g. 256 users x 512 beams of target tokens) cuDNN fails
# (pytorch/pytorch#181085, torch 2.11) and flash/efficient report "invalid argument" (seen on an
# H100). Splitting the batch computes exactly the same thing.
SDPA_MAX_BATCH = 2**15


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_batch: int = SDPA_MAX_BATCH, **kwargs):
    """F.scaled_dot_product_attention over [S, H, L, d_head], in chunks of at most `max_batch` sequences."""
    if q.shape[0] <= max_batch:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if isinstance(kwargs.get("attn_mask"), torch.Tensor):
        raise ValueError("attention(): chunking with a tensor attn_mask is not supported")
    chunks = zip(q.split(max_batch), k.split(max_batch), v.split(max_batch), strict=True)
    return torch.cat([F.scaled_dot_product_attention(qc, kc, vc, **kwargs) for qc, kc, vc in chunks])


def rmsnorm(x, weight, eps: float, residual=None, quantize: bool = False):
    """(x_out, y) or (x_out, y_fp8, scale); x_out = x + residual (or x), y = RMSNorm(x_out)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    if not quantize:
        return x, y
    return (x, *quantize_per_token(y))


def silu_mul(gate_up, quantize: bool = False):
    """gate_up [..., 2H] = [w1 x | w3 x] -> SiLU(gate) * up [..., H] (or its FP8 + per-token scale)."""
    gate, up = gate_up.chunk(2, dim=-1)
    y = F.silu(gate) * up
    return quantize_per_token(y) if quantize else y


def quantize_rows(x):
    return quantize_per_token(x)


def cross_attention(q, k, v, mask=None):
    return F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=None if mask is None else mask[:, None, None, :],
        enable_gqa=k.shape[1] != q.shape[1],
    )


def cached_self_attention(qkv, past: list, rows: list) -> torch.Tensor:
    """Causal self-attention of the newest token over its beam's earlier tokens (see onerec.kernels)."""
    R, _, H, dh = qkv.shape
    if not past:  # one key: softmax weight 1
        return qkv[:, 2].reshape(R, H * dh)
    keys = [p[r, 1] for p, r in zip(past, rows, strict=True)] + [qkv[:, 1]]
    values = [p[r, 2] for p, r in zip(past, rows, strict=True)] + [qkv[:, 2]]
    k, v = torch.stack(keys, 2), torch.stack(values, 2)  # [R, H, t + 1, dh]
    out = attention(qkv[:, 0, :, None], k, v)  # [R, H, 1, dh]
    return out.reshape(R, H * dh)
