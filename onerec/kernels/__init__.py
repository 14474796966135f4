"""The serving path's ops, one entry per op with a kernel choice: `Kernel.TORCH` (the reference,
any device) or `Kernel.TRITON` (CUDA). The engine's serving modules (onerec/engine/layers.py) call
these entries with the kernel the engine chose for them; the plain model (onerec/model.py) never
does. Nothing here imports the model: what an op needs of it (weights, eps, expert layers) is
passed in.

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
  expert GEMMs (bf16 or FP8 blocks) and the combine, without host syncs (onerec/kernels/fused_moe.py
  has the weights, the plan and the reference; onerec/kernels/triton_fused_moe.py the kernels).

The references (onerec/kernels/reference.py) have the same rounding as the unfused model ops, so a
fused result equals what the model's FP8Linear would have computed; tests/gpu/test_kernels.py
compares each Triton kernel (onerec/kernels/triton_kernels.py) with its reference. The larger
MoE op keeps entry and reference in its own module and its Triton kernels beside
(triton_fused_moe.py); tests/unit/test_engine_kernels.py checks those kernels on CPU through
Triton's interpreter.
"""

from __future__ import annotations

import enum

import torch

from onerec.kernels import flash_attention, fused_moe, reference
from onerec.kernels.fused_moe import MoEWeights
from onerec.kernels.reference import SDPA_MAX_BATCH, QuantizedRows, attention

__all__ = [
    "SDPA_MAX_BATCH", "Kernel", "MoEWeights", "QuantizedRows", "attention", "cached_self_attention",
    "cross_attention", "moe", "quantize_rows", "rmsnorm", "silu_mul",
]


class Kernel(enum.Enum):
    """Which implementation of the ops runs: the PyTorch references or the Triton kernels."""

    TORCH = "torch"
    TRITON = "triton"

    @classmethod
    def parse(cls, value: str | Kernel, what: str = "kernel") -> Kernel:
        """A name from a CLI or config ("torch" | "triton") -> the Kernel; ValueError in one line."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} {value!r}; known: {', '.join(k.value for k in cls)}") from None


def _triton():
    from onerec.kernels import triton_kernels  # needs triton (CUDA builds of torch, the dev extra)

    return triton_kernels


def rmsnorm(x, weight, eps: float, residual=None, quantize: bool = False, kernel: Kernel = Kernel.TORCH):
    if kernel is Kernel.TRITON:
        out = _triton().rmsnorm(x, weight, eps, residual, quantize)
    else:
        out = reference.rmsnorm(x, weight, eps, residual, quantize)
    return (out[0], QuantizedRows(*out[1:])) if quantize else out


def silu_mul(gate_up, quantize: bool = False, kernel: Kernel = Kernel.TORCH):
    out = (_triton().silu_mul if kernel is Kernel.TRITON else reference.silu_mul)(gate_up, quantize)
    return QuantizedRows(*out) if quantize else out


def quantize_rows(x, kernel: Kernel = Kernel.TORCH) -> QuantizedRows:
    return QuantizedRows(*(_triton().quantize_rows if kernel is Kernel.TRITON else reference.quantize_rows)(x))


def cross_attention(q, k, v, mask=None, kernel: Kernel = Kernel.TORCH, key_start=None, cache: dict | None = None):
    """q [B, H, N, dh] over k/v [B, G, T, dh] (G divides H), mask [B, T] or None -> [B, H, N, dh].

    `Kernel.TRITON` on a GPU with `key_start` (each user's real keys are key_start[b]..T-1):
    FlashAttention-2's variable-length kernel over the real keys only (onerec/kernels/flash_attention.py);
    otherwise SDPA with the mask. (An FP8 attention kernel measured 0.38-0.46x SDPA's speed on an
    H200 on 2026-12-04 and was removed: bench/README.md.)
    """
    if kernel is Kernel.TRITON and key_start is not None and flash_attention.supported(q):
        return flash_attention.cross_attention(q, k, v, key_start, cache)
    return reference.cross_attention(q, k, v, mask)


def cached_self_attention(qkv, past: list, rows: list, kernel: Kernel = Kernel.TORCH):
    """qkv [R, 3, H, dh] of the newest token -> attention output [R, H * dh] over tokens 0..t.

    past[j] [R_j, 3, H, dh]: q|k|v rows of token j; rows[j] [R]: each of the R rows' row in past[j]
    (the beam's ancestor at token j). The Triton kernel covers t = 1, 2 (three levels).
    """
    if kernel is Kernel.TRITON and len(past) in (1, 2):
        return _triton().cached_self_attention(qkv, past, rows)
    return reference.cached_self_attention(qkv, past, rows)


def moe(x: torch.Tensor, w: MoEWeights, kernel: Kernel = Kernel.TORCH, config: dict | None = None) -> torch.Tensor:
    """MoE layer on x [..., d] -> [..., d] (what the model's MoE module computes). config: Triton
    launch values overriding the device table's or heuristic config (`triton_fused_moe.moe_config`):
    BLOCK_M, per-kernel dicts gate_up / down, or BLOCK_N, BLOCK_K, num_warps, num_stages for both."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"moe: kernel must be a Kernel, got {kernel!r}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    gates, experts = fused_moe.route(x2, w.router, w.top_k)
    if kernel is Kernel.TRITON:
        from onerec.kernels import triton_fused_moe  # needs triton (CUDA builds of torch, the dev extra)

        out = triton_fused_moe.moe(x2, gates, experts, w, config)
    else:
        out = fused_moe.moe_reference(x2, gates, experts, w)
    if w.shared is not None:
        out = out + w.shared(x2)
    return out.reshape(shape)
