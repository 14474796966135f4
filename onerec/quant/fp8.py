"""FP8 (E4M3) primitives: scales, saturating casts, scaled matmuls and the FP8Linear layer.

Conventions (the paper's recipe, see ../shared/REFERENCE.md):
- a scale is the *decoding* factor: x ~= x_fp8.float() * scale, scale = amax / E4M3_MAX;
- casts saturate: values are clamped to +-448 before the cast (E4M3 has no Inf; an unclamped
  overflow would otherwise depend on the backend's rounding);
- scales are guarded against zero: amax is clamped to AMAX_MIN, so an all-zero row quantizes to
  zeros instead of 0/0 = NaN;
- matmuls accumulate in FP32 and return the caller's dtype (bf16 in serving).

Shapes: weights are [N, K] (nn.Linear layout), activations [..., K].

torch._scaled_mm (the FP8 GEMM; torch 2.13 runs it on CPU too, tensor-wise and row-wise):
  _scaled_mm(a [M, K] fp8 row-major, b [K, N] fp8 column-major (= w_fp8.t()),
             scale_a fp32 [M, 1] contiguous, scale_b fp32 [1, N] contiguous, out_dtype)
- CUDA additionally needs K and N multiples of 16 (the recipes report layers that are not) and,
  for row-wise scales, a bf16 output: the fp32 case asks for bf16 on CUDA and casts back.
- Block scales (1x128 activations x 128x128 weights) exist in _scaled_mm only on recent CUDA
  with scale-layout constraints; the CPU build rejects them. `scaled_mm_blockwise` therefore
  dequantizes and multiplies in FP32 (numerically the same product, no FP8 speed-up); the fast
  block GEMM is the inference engine's job (onerec/engine).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from onerec.errors import UserError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_MIN = 1e-12  # scale floor: an all-zero row/tensor gets a tiny non-zero scale
BLOCK = 128  # block edge of the fp8_block recipe (128x128 weights, 1x128 activations)

WEIGHT_GRANULARITIES = ("per_channel", "block")
ACTIVATION_MODES = ("per_token", "per_tensor", "block")


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Decoding scale (fp32) for absolute maxima `amax`, guarded against zero."""
    return amax.float().clamp(min=AMAX_MIN) / E4M3_MAX


def cast_to_e4m3(x_scaled: torch.Tensor) -> torch.Tensor:
    """Saturating cast of already-scaled values to E4M3 (clamp first, then cast)."""
    return x_scaled.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (w_fp8 [N, K], scale fp32 [N]): one scale per output channel (row)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_per_channel expects a 2-D weight [N, K], got {tuple(w.shape)}")
    scale = scale_from_amax(w.detach().abs().amax(dim=1))
    return cast_to_e4m3(w.float() / scale[:, None]), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_fp8 [..., K], scale fp32 [..., 1]): one scale per token (row), at run time."""
    scale = scale_from_amax(x.detach().abs().amax(dim=-1, keepdim=True))
    return cast_to_e4m3(x.float() / scale), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x -> x_fp8 with one given (e.g. calibrated) decoding scale; values beyond 448*scale saturate."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).clamp(min=AMAX_MIN / E4M3_MAX)
    return cast_to_e4m3(x.float() / scale)


def _pad_to_blocks(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    R, C = x.shape[-2:]
    return F.pad(x, (0, -C % cols, 0, -R % rows))


def quantize_blockwise(x: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scales over the last two dims; partial edge blocks are allowed.

    Weights: block (128, 128), w [N, K] -> scale [ceil(N/128), ceil(K/128)].
    Activations: block (1, 128), x [..., M, K] -> scale [..., M, ceil(K/128)].
    """
    br, bc = block
    if x.dim() < 2:
        raise ValueError(f"quantize_blockwise expects at least 2 dims, got {tuple(x.shape)}")
    R, C = x.shape[-2:]
    xf = x.detach().float()
    padded = _pad_to_blocks(xf, br, bc)  # zeros do not change an absolute maximum
    lead = padded.shape[:-2]
    blocks = padded.reshape(*lead, padded.shape[-2] // br, br, padded.shape[-1] // bc, bc)
    scale = scale_from_amax(blocks.abs().amax(dim=(-3, -1)))
    return cast_to_e4m3(xf / expand_block_scale(scale, (R, C), block)), scale


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Block scale [..., ceil(R/br), ceil(C/bc)] -> element scale [..., R, C]."""
    br, bc = block
    R, C = shape
    return scale.repeat_interleave(br, dim=-2)[..., :R, :].repeat_interleave(bc, dim=-1)[..., :C]


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """FP32 values of an FP8 tensor: per-channel/per-token/per-tensor scales broadcast; block scales expand."""
    if block is not None:
        scale = expand_block_scale(scale, tuple(x_fp8.shape[-2:]), block)
    return x_fp8.float() * scale


@functools.cache
def cpu_has_rowwise_scaled_mm() -> bool:
    """torch 2.13's CPU build runs row-wise scaled FP8 GEMMs; older ones (2.11) only per-tensor."""
    a = torch.ones(16, 16).to(E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
        return True
    except RuntimeError:
        return False


def scaled_mm_rowwise(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(x_fp8 * x_scale) @ (w_fp8 * w_scale).T through torch._scaled_mm, FP32 accumulation.

    x_fp8 [M, K], x_scale [M, 1] (or a scalar: per-tensor), w_fp8 [N, K], w_scale [N] or [1, N].
    """
    M, N = x_fp8.shape[0], w_fp8.shape[0]
    if M == 0:
        return torch.empty(0, N, dtype=out_dtype, device=x_fp8.device)
    # _scaled_mm has no mixed tensor-wise x row-wise mode: a per-tensor scale becomes a column.
    scale_a = x_scale.float().reshape(-1, 1).expand(M, 1).contiguous()
    scale_b = w_scale.float().reshape(1, N).contiguous()
    if not x_fp8.is_cuda and not cpu_has_rowwise_scaled_mm():
        # The same product of FP8 values with FP32 accumulation, without the fused kernel.
        return ((x_fp8.float() * scale_a) @ (w_fp8.float() * scale_b.t()).t()).to(out_dtype)
    gemm_dtype = torch.bfloat16 if x_fp8.is_cuda else out_dtype  # CUDA row-wise: bf16 output only
    out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=gemm_dtype)
    return out.to(out_dtype)


def scaled_mm_blockwise(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, block: int = BLOCK,
) -> torch.Tensor:
    """Block-scaled product: x [M, K] with x_scale [M, ceil(K/b)] (1 x b blocks) or [M, 1] (per
    token), w [N, K] with w_scale [ceil(N/b), ceil(K/b)] (b x b blocks).

    Dequantize-and-matmul in FP32 (see the module docstring: no block-scaled _scaled_mm on CPU).
    """
    K = x_fp8.shape[-1]
    x = x_fp8.float() * (x_scale.float() if x_scale.shape[-1] == 1 else expand_block_scale(x_scale, (x_fp8.shape[0], K), (1, block)))
    w = dequantize(w_fp8, w_scale, (block, block))
    return (x @ w.t()).to(out_dtype)


def scaled_mm_reference(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    block: int | None = None,
) -> torch.Tensor:
    """Float64 reference of the FP8 product (for tests): the exact product of the dequantized values."""
    if block is None:
        x = x_fp8.double() * x_scale.double().reshape(-1, 1)
        w = w_fp8.double() * w_scale.double().reshape(-1, 1)
    else:
        xs = x_scale.double()
        x = x_fp8.double() * (xs if xs.shape[-1] == 1 else expand_block_scale(xs, tuple(x_fp8.shape), (1, block)))
        w = w_fp8.double() * expand_block_scale(w_scale.double(), tuple(w_fp8.shape), (block, block))
    return x @ w.t()


def check_finite(t: torch.Tensor, layer: str, what: str) -> None:
    """NaN/Inf make every scale meaningless: refuse them, naming the layer."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise UserError(f"layer {layer}: {what} contains {bad} NaN/Inf value(s); cannot quantize to FP8")


class FP8Linear(nn.Module):
    """Drop-in replacement of a bias-free (or biased) nn.Linear with FP8 weights and activations.

    Buffers:
      weight_fp8   [N, K] float8_e4m3fn
      weight_scale fp32 [N] (per_channel) or [ceil(N/128), ceil(K/128)] (block)
      input_scale  fp32 [] (activation per_tensor only: static, from calibration)
      bias         optional, kept in high precision
    Activation modes: per_token (dynamic, row-wise, the default), per_tensor (static), block
    (dynamic 1x128). Output dtype = input dtype; accumulation in FP32.
    """

    def __init__(
        self, in_features: int, out_features: int, weight_granularity: str = "per_channel",
        activation: str = "per_token", bias: bool = False, block: int = BLOCK, name: str = "",
    ):
        super().__init__()
        if weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {weight_granularity!r}")
        if activation not in ACTIVATION_MODES:
            raise ValueError(f"activation must be one of {ACTIVATION_MODES}, got {activation!r}")
        if activation == "block" and weight_granularity != "block":
            raise ValueError("block activations need block weights (the fp8_block recipe)")
        self.in_features, self.out_features = in_features, out_features
        self.weight_granularity, self.activation, self.block, self.name = weight_granularity, activation, block, name
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=E4M3))
        if weight_granularity == "per_channel":
            scale_shape = (out_features,)
        else:
            scale_shape = (math.ceil(out_features / block), math.ceil(in_features / block))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32))
        if activation == "per_tensor":
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
        else:
            self.register_buffer("input_scale", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weight_granularity: str = "per_channel", activation: str = "per_token",
        input_scale: float | torch.Tensor | None = None, block: int = BLOCK, name: str = "",
    ) -> FP8Linear:
        """Quantize a trained nn.Linear (offline, weights only; `input_scale` for static activations)."""
        w = linear.weight.detach()
        check_finite(w, name, "weight")
        layer = cls(
            linear.in_features, linear.out_features, weight_granularity, activation,
            bias=linear.bias is not None, block=block, name=name,
        ).to(w.device)
        if weight_granularity == "per_channel":
            w_fp8, w_scale = quantize_per_channel(w)
        else:
            w_fp8, w_scale = quantize_blockwise(w, (block, block))
        layer.weight_fp8.copy_(w_fp8)
        layer.weight_scale.copy_(w_scale)
        if activation == "per_tensor":
            if input_scale is None:
                raise ValueError(f"layer {name}: static per-tensor activations need a calibrated input_scale")
            scale = torch.as_tensor(input_scale, dtype=torch.float32)
            check_finite(scale, name, "calibrated input scale")
            layer.input_scale.copy_(scale.clamp(min=AMAX_MIN / E4M3_MAX))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor, float8 and the scales included: keep their
        # dtypes and follow only the device (model.to(torch.bfloat16) must not touch FP8 weights).
        fixed = {n: b for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for n, b in fixed.items():
            self._buffers[n] = b.to(self._buffers[n].device)
        return self

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] -> (x_fp8, scale) in this layer's activation mode."""
        if self.activation == "per_token":
            return quantize_per_token(x2d)
        if self.activation == "per_tensor":
            return quantize_per_tensor(x2d, self.input_scale), self.input_scale
        return quantize_blockwise(x2d, (1, self.block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        x_fp8, x_scale = self.quantize_input(x2d)
        if self.weight_granularity == "per_channel":
            out = scaled_mm_rowwise(x_fp8, x_scale, self.weight_fp8, self.weight_scale, x.dtype)
        else:
            out = scaled_mm_blockwise(x_fp8, x_scale, self.weight_fp8, self.weight_scale, x.dtype, self.block)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """FP32 weight [N, K] that this layer effectively multiplies by."""
        if self.weight_granularity == "per_channel":
            return dequantize(self.weight_fp8, self.weight_scale[:, None])
        return dequantize(self.weight_fp8, self.weight_scale, (self.block, self.block))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={self.weight_granularity}, activation={self.activation}, name={self.name!r}"
        )
