"""A model converted for serving: the model's module tree copied over the same tensors, with the
engine's own modules swapped in (as gpt-fast's convert_for_runtime swaps Linear layers and vLLM's
quant_method picks each layer's method). The caller's model is left as it is.

`serving_model(model, fp8, quantize_context, kernel, moe_kernel)` swaps in
- every Linear of the context projection and the blocks: a `ServingLinear` with its method
  (onerec/engine/linear.py: bf16, or FP8 row-wise, or the layer's own forward);
- each dense FFN whose w1, w3 and w2 can: a `ServingSwiGLU` over one w1|w3 GEMM;
- each MoE, with `moe_kernel` set: a `FusedMoE` over its experts stacked once;
- where the kernel or the output differs from the model's module (Triton kernels, or an FP8 GEMM
  after it): `ServingRMSNorm` (residual add + norm + FP8 output in one pass) and the serving
  attention ops (onerec/engine/layers.py). Elsewhere the model's module serves as it is.

New tensors are only the layouts a kernel needs, made once per conversion: w1|w3 concatenated,
bf16 weights quantized to FP8 with fp8=True (FP8Linear weights are taken as they are), MoE experts
stacked. One Engine converts once and serves every beam width and batch bucket on that view.
"""

from __future__ import annotations

import copy
import itertools

from torch import nn

from onerec.engine.layers import (
    FusedMoE,
    ServingCachedSelfAttention,
    ServingContextAttention,
    ServingRMSNorm,
    ServingSwiGLU,
    stack_experts,
)
from onerec.engine.linear import ModuleMethod, fuse, serving_linear
from onerec.kernels import Kernel
from onerec.model import MoE, OneRecV2, RMSNorm, SwiGLU

# Layers (name suffixes) whose FP8 input serving_model has the kernel before them emit in the same
# pass: the RMSNorm before context.proj, cross_q, self_qkv and w1|w3, the SiLU*mul before w2. The
# others (cross_o, self_o) quantize their input in a quantize_rows pass of their own. The timed
# per-layer choice (onerec/engine/layer_choice.py) times each GEMM with or without that pass.
FUSED_INPUT = frozenset({"context.proj", "cross_q", "self_qkv", "ffn.w1", "ffn.w3", "ffn.w2"})


def shared_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def serving_model(model: OneRecV2, fp8: bool, quantize_context: bool, kernel: Kernel,
                  moe_kernel: Kernel | None = None) -> OneRecV2:
    """The serving view of `model` (see module doc); heads and norms stay in high precision."""
    view = shared_weights_copy(model).eval()
    dtype = model.token_embedding.weight.dtype

    def linear(module, quantize=fp8):
        return serving_linear(module, quantize, kernel, dtype)

    def norm(module: RMSNorm, quantize_output: bool = False) -> nn.Module:
        if kernel is Kernel.TORCH and not quantize_output:
            return module
        return ServingRMSNorm(module, kernel, quantize_output)

    ctx = view.context
    ctx.proj = linear(ctx.proj, fp8 and quantize_context)
    ctx.input_norm = norm(ctx.input_norm, ctx.proj.takes_fp8)
    for block in view.blocks:
        for name in ("cross_q", "cross_o", "self_qkv", "self_o"):
            setattr(block, name, linear(getattr(block, name)))
        block.cross_norm = norm(block.cross_norm, block.cross_q.takes_fp8)
        block.self_norm = norm(block.self_norm, block.self_qkv.takes_fp8)
        if kernel is not Kernel.TORCH:
            block.cross_attn = ServingContextAttention(kernel)
            block.cached_self_attn = ServingCachedSelfAttention(kernel)
        ffn = block.ffn
        if isinstance(ffn, SwiGLU):
            w13, w2 = fuse(linear(ffn.w1), linear(ffn.w3)), linear(ffn.w2)
            if w13 is not None and not isinstance(w2.method, ModuleMethod):
                block.ffn = ServingSwiGLU(w13, w2, kernel)
                block.ffn_norm = norm(block.ffn_norm, w13.takes_fp8)
            # else: layers that cannot share a GEMM: the FFN as it is, on bf16 input
        elif isinstance(ffn, MoE) and moe_kernel is not None:
            # fp8: bf16 experts quantized here in 128x128 blocks (the fp8_block layout); FP8Linear
            # experts are taken as they are. None: a layout the grouped GEMM cannot take (module stays).
            weights = stack_experts(ffn, fp8=True if fp8 else None)
            if weights is not None:
                block.ffn = FusedMoE(weights, moe_kernel)
    # the other norms (context keys/values, the FFN norms left, the heads): the kernel only
    for name, module in list(view.named_modules()):
        if type(module) is RMSNorm:
            parent, _, attr = name.rpartition(".")
            setattr(view.get_submodule(parent), attr, norm(module))
    return view
