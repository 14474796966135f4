"""The serving path's ops, one entry per op with a kernel switch: `kernel="torch"` (the reference,
any device) or `kernel="triton"` (CUDA). The model's modules call these entries with their own
`kernel` attribute (onerec/model.py); the engine sets it per module (onerec/engine/engine.py).

- `rmsnorm(x, weight, eps, residual=None, quantize=False)`: optionally adds the residual branch
  first (x + residual, written back on Triton: the add of the previous sublayer is fused into the
  next norm), normalises, and returns (new x, y) with y bf16 or `QuantizedRows` (FP8 + per-token
  scale) for an FP8 GEMM;
- `silu_mul(gate_up, quantize=False)`: SiLU(gate) * up of a fused w1|w3 GEMM output;
- `quantize_rows(x)`: per-token FP8 quantization alone (attention outputs);
- `cross_attention(q, k, v, mask)`: the beams of a user as query rows over that user's context
  (bf16 SDPA; on a GPU FlashAttention-2's variable-length kernel over each user's real keys);
- `cached_self_attention(qkv, past, rows)`: the newest target token over the earlier ones of its beam;
- `moe(x, weights)`: a whole MoE layer over experts stacked once (`MoEWeights`): routing, grouped
  expert GEMMs (bf16 or FP8 blocks) and the combine, without host syncs (onerec/kernels/fused_moe.py).

The references (onerec/kernels/reference.py) have the same rounding as the unfused model ops, so a
fused result equals what the model's FP8Linear would have computed; tests/gpu/test_kernels.py
compares each Triton kernel (onerec/kernels/triton_kernels.py) with its reference. The larger
MoE op keeps entry and reference in its own module and its Triton kernels beside
(triton_fused_moe.py); tests/unit/test_engine_kernels.py checks those kernels on CPU through
Triton's interpreter.
"""

from __future__ import annotations

from onerec.kernels import reference
from onerec.kernels.fused_moe import MoEWeights, moe
from onerec.kernels.reference import SDPA_MAX_BATCH, QuantizedRows, attention

KERNELS = ("torch", "triton")

__all__ = [
    "KERNELS", "SDPA_MAX_BATCH", "MoEWeights", "QuantizedRows", "attention", "cached_self_attention",
    "cross_attention", "moe", "quantize_rows", "rmsnorm", "silu_mul",
]


def _triton():
    from onerec.kernels import triton_kernels

    return triton_kernels


def rmsnorm(x, weight, eps: float, residual=None, quantize: bool = False, kernel: str = "torch"):
    if kernel == "triton":
        out = _triton().rmsnorm(x, weight, eps, residual, quantize)
    else:
        out = reference.rmsnorm(x, weight, eps, residual, quantize)
    return (out[0], QuantizedRows(*out[1:])) if quantize else out


def silu_mul(gate_up, quantize: bool = False, kernel: str = "torch"):
    out = (_triton().silu_mul if kernel == "triton" else reference.silu_mul)(gate_up, quantize)
    return QuantizedRows(*out) if quantize else out


def quantize_rows(x, kernel: str = "torch") -> QuantizedRows:
    return QuantizedRows(*(_triton().quantize_rows if kernel == "triton" else reference.quantize_rows)(x))


def cross_attention(q, k, v, mask=None, kernel: str = "torch", key_start=None, cache: dict | None = None):
    """q [B, H, N, dh] over k/v [B, G, T, dh] (G divides H), mask [B, T] or None -> [B, H, N, dh].

    `kernel="triton"` on a GPU with `key_start` (each user's real keys are key_start[b]..T-1):
    FlashAttention-2's variable-length kernel over the real keys only (onerec/kernels/flash_attention.py);
    otherwise SDPA with the mask. (An FP8 attention kernel measured 0.38-0.46x SDPA's speed on an
    H200 on 2026-12-04 and was removed: bench/README.md.)
    """
    if kernel == "triton" and key_start is not None:
        from onerec.kernels import flash_attention

        if flash_attention.supported(q):
            return flash_attention.cross_attention(q, k, v, key_start, cache)
    return reference.cross_attention(q, k, v, mask)


def cached_self_attention(qkv, past: list, rows: list, kernel: str = "torch"):
    """qkv [R, 3, H, dh] of the newest token -> attention output [R, H * dh] over tokens 0..t.

    past[j] [R_j, 3, H, dh]: q|k|v rows of token j; rows[j] [R]: each of the R rows' row in past[j]
    (the beam's ancestor at token j). The Triton kernel covers t = 1, 2 (three levels).
    """
    if kernel == "triton" and len(past) in (1, 2):
        return _triton().cached_self_attention(qkv, past, rows)
    return reference.cached_self_attention(qkv, past, rows)
