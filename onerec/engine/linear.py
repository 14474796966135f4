"""Linear layers of the serving model, vLLM style: the engine's quantization config hands each
layer a method with `create_weights` / `process_weights_after_loading` / `apply`, chosen once.

- `UnquantizedMethod`: the bf16 weight as it is (shared with the source layer, not copied);
- `FP8RowwiseMethod`: FP8 weight with per-channel scales x FP8 activations with per-token scales
  through `onerec.quant.fp8.scaled_mm_rowwise` (torch._scaled_mm). Taken from an FP8Linear of the
  fp8_dynamic layout, or quantized from a bf16 layer on the fly. Its input may arrive already in
  FP8 (`kernels.QuantizedRows`, from a norm or SiLU*mul kernel that quantized it in the same pass);
  a plain tensor is quantized first by the `quantize_rows` op;
- `ModuleMethod`: any other layer (biases, static or block FP8 recipes) runs its own forward.

`fuse(a, b)` stacks two layers along their outputs as one GEMM (w1|w3 of SwiGLU): per-channel
scales concatenate exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onerec import kernels
from onerec.kernels import Kernel
from onerec.quant.fp8 import FP8Linear, quantize_per_channel, scaled_mm_rowwise


class LinearMethod:
    takes_fp8 = False  # the input may come as kernels.QuantizedRows

    def create_weights(self, layer: ServingLinear, source: nn.Module) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: ServingLinear) -> None:
        pass

    def apply(self, layer: ServingLinear, x) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedMethod(LinearMethod):
    def create_weights(self, layer, source):
        layer.weight = source.weight.detach()

    def apply(self, layer, x):
        return F.linear(x, layer.weight)


class FP8RowwiseMethod(LinearMethod):
    takes_fp8 = True

    def __init__(self, kernel: Kernel = Kernel.TORCH):
        self.kernel = kernel

    def create_weights(self, layer, source):
        if isinstance(source, FP8Linear):
            layer.w_fp8, layer.w_scale = source.weight_fp8, source.weight_scale
        else:
            layer.weight = source.weight.detach()

    def process_weights_after_loading(self, layer):
        if getattr(layer, "weight", None) is not None:  # a bf16 layer: quantized once, here
            layer.w_fp8, layer.w_scale = quantize_per_channel(layer.weight)
            layer.weight = None

    def apply(self, layer, x):
        if not isinstance(x, kernels.QuantizedRows):
            x = kernels.quantize_rows(x, kernel=self.kernel)
        shape = x.data.shape
        out = scaled_mm_rowwise(
            x.data.reshape(-1, shape[-1]), x.scale.reshape(-1, 1), layer.w_fp8, layer.w_scale, layer.out_dtype,
        )
        return out.view(*shape[:-1], -1)


class ModuleMethod(LinearMethod):
    def create_weights(self, layer, source):
        layer.source = source

    def apply(self, layer, x):
        return layer.source(x)


class ServingLinear(nn.Module):
    """One GEMM y = x W^T computed by its method (see module doc)."""

    def __init__(self, source: nn.Module | None, method: LinearMethod, out_dtype: torch.dtype):
        super().__init__()
        self.method, self.out_dtype = method, out_dtype
        self.weight = self.w_fp8 = self.w_scale = None
        if source is not None:
            method.create_weights(self, source)
            method.process_weights_after_loading(self)

    @property
    def takes_fp8(self) -> bool:
        return self.method.takes_fp8

    def forward(self, x) -> torch.Tensor:
        return self.method.apply(self, x)


def linear_method(module: nn.Module, fp8: bool, kernel: Kernel) -> LinearMethod:
    """The method of one layer: FP8Linear layers of the row-wise layout stay FP8 whatever `fp8` says
    (their weights exist only in FP8); bias-free bf16 layers become FP8 when `fp8` is set."""
    if isinstance(module, FP8Linear):
        rowwise = module.weight_granularity == "per_channel" and module.activation == "per_token"
        return FP8RowwiseMethod(kernel) if rowwise and module.bias is None else ModuleMethod()
    if isinstance(module, nn.Linear) and module.bias is None:
        return FP8RowwiseMethod(kernel) if fp8 else UnquantizedMethod()
    return ModuleMethod()


def serving_linear(module: nn.Module, fp8: bool, kernel: Kernel, out_dtype: torch.dtype) -> ServingLinear:
    return ServingLinear(module, linear_method(module, fp8, kernel), out_dtype)


def fuse(a: ServingLinear, b: ServingLinear) -> ServingLinear | None:
    """[a; b] along the outputs as one GEMM, or None where the two cannot share one."""
    if type(a.method) is not type(b.method) or isinstance(a.method, ModuleMethod):
        return None
    fused = ServingLinear(None, a.method, a.out_dtype)
    if isinstance(a.method, FP8RowwiseMethod):
        fused.w_fp8, fused.w_scale = torch.cat([a.w_fp8, b.w_fp8]), torch.cat([a.w_scale, b.w_scale])
    else:
        fused.weight = torch.cat([a.weight, b.weight])
    return fused
