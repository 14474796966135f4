"""The serving modules the engine swaps into a model (onerec/engine/convert.py), each computing what
the model's module computes with the kernel the engine chose (`Kernel`, onerec/kernels):

- `ServingRMSNorm`: the residual add of the previous sublayer, the norm and, where an FP8 GEMM
  follows, the FP8 quantization of its output (`kernels.QuantizedRows`) in one pass;
- `ServingSwiGLU`: SiLU(gate) * up over one w1|w3 GEMM, optionally emitting FP8 for w2;
- `ServingContextAttention` / `ServingCachedSelfAttention`: the attention ops on their kernels
  (FlashAttention-2 over each user's real keys; the cached self-attention read in place);
- `FusedMoE`: the whole MoE layer as the op `kernels.moe` over experts stacked once.

Each takes the model module's weights as they are (the same tensors): only layouts a kernel needs
(w1|w3 concatenated, experts stacked, FP8 quantized on the fly) are new tensors, made once.
"""

from __future__ import annotations

import torch
from torch import nn

from onerec import kernels
from onerec.engine.linear import ServingLinear
from onerec.kernels import Kernel, MoEWeights
from onerec.model import MoE, RMSNorm


class ServingRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm, kernel: Kernel, quantize_output: bool):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps  # the model's parameter itself
        self.kernel = kernel
        self.quantize_output = quantize_output  # True: the output is kernels.QuantizedRows for an FP8 GEMM

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        """(x + residual, RMSNorm(x + residual)) in one pass."""
        return kernels.rmsnorm(x, self.weight, self.eps, residual, self.quantize_output, kernel=self.kernel)

    def forward(self, x: torch.Tensor):
        return self.add_norm(x, None)[1]


class ServingSwiGLU(nn.Module):
    def __init__(self, w13: ServingLinear, w2: ServingLinear, kernel: Kernel):
        super().__init__()
        self.w13, self.w2 = w13, w2  # w13: gate|up as one GEMM
        self.kernel = kernel
        self.quantize_hidden = w2.takes_fp8  # SiLU * up leaves as kernels.QuantizedRows for an FP8 w2

    def forward(self, x) -> torch.Tensor:
        return self.w2(kernels.silu_mul(self.w13(x), self.quantize_hidden, kernel=self.kernel))


class ServingContextAttention(nn.Module):
    def __init__(self, kernel: Kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, q, k, v, ctx) -> torch.Tensor:
        return kernels.cross_attention(q, k, v, ctx.mask if ctx.padded else None, kernel=self.kernel,
                                       key_start=ctx.key_start, cache=ctx.kernel_cache)


class ServingCachedSelfAttention(nn.Module):
    def __init__(self, kernel: Kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, qkv, past: list, rows: list) -> torch.Tensor:
        return kernels.cached_self_attention(qkv, past, rows, kernel=self.kernel)


def stack_experts(moe: MoE, fp8: bool | None = None) -> MoEWeights | None:
    """`moe`'s experts stacked for the fused op (`MoEWeights.from_experts`; None: mixed formats)."""
    return MoEWeights.from_experts(moe.router.weight, list(moe.experts), moe.shared, moe.top_k, fp8)


class FusedMoE(nn.Module):
    """The MoE layer as one op (`kernels.moe`): routing and grouped expert GEMMs without host syncs
    with `Kernel.TRITON`; `Kernel.TORCH` runs the op's reference (it syncs once per call)."""

    def __init__(self, weights: MoEWeights | None, kernel: Kernel):
        super().__init__()
        if weights is None:
            raise ValueError(f"MoE kernel {kernel.value!r} needs the stacked experts (stack_experts)")
        self.weights, self.kernel = weights, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.moe(x, self.weights, kernel=self.kernel)
