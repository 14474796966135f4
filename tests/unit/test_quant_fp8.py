"""FP8 primitives against a float64 reference: scales, saturation, zero guards, FP8Linear numerics."""

import pytest
import torch

from onerec.errors import UserError
from onerec.quant.fp8 import (
    E4M3,
    E4M3_MAX,
    FP8Linear,
    cast_to_e4m3,
    dequantize,
    quantize_blockwise,
    quantize_per_channel,
    quantize_per_tensor,
    quantize_per_token,
    scaled_mm_blockwise,
    scaled_mm_reference,
    scaled_mm_rowwise,
)

# Representable E4M3 neighbours differ by at most 2^-3 relative (3 mantissa bits): round-to-nearest
# errs by at most half of that (normal range).
E4M3_HALF_ULP = 2.0**-4


def _linear(n, k, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.05)
    return lin


def test_saturation_at_448_and_no_nan_from_overflow():
    x = torch.tensor([1e6, -1e6, 448.0, 500.0, -449.0, 1.0])
    q = cast_to_e4m3(x).float()
    assert q.tolist() == [448.0, -448.0, 448.0, 448.0, -448.0, 1.0]
    # Per-tensor static scale: values past 448 * scale saturate instead of becoming NaN.
    q = quantize_per_tensor(torch.tensor([0.5, 10.0, -10.0]), scale=1.0 / 448).float() / 448
    assert torch.isfinite(q).all() and q.tolist() == [0.5, 1.0, -1.0]


def test_per_channel_scales_are_per_channel():
    w = torch.randn(8, 32, dtype=torch.float64)
    w[3] *= 1000.0  # one loud row must not change the others' scales
    w_fp8, scale = quantize_per_channel(w)
    assert w_fp8.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (8,)
    torch.testing.assert_close(scale.double(), w.abs().amax(1) / E4M3_MAX, rtol=1e-6, atol=0)
    # Each row's absolute maximum lands exactly on 448 (it is representable).
    assert (w_fp8.float().abs().amax(1) == E4M3_MAX).all()
    rel = (dequantize(w_fp8, scale[:, None]).double() - w).abs() / w.abs().amax(1, keepdim=True)
    assert rel.max() <= E4M3_HALF_ULP + 1e-7


def test_per_token_scales_and_zero_rows():
    x = torch.randn(2, 5, 64)
    x[0, 2] = 0.0  # an all-zero token must not divide by zero
    x_fp8, scale = quantize_per_token(x)
    assert scale.shape == (2, 5, 1) and (scale > 0).all()
    assert (x_fp8[0, 2].float() == 0).all()
    assert torch.isfinite(dequantize(x_fp8, scale)).all()
    w_fp8, w_scale = quantize_per_channel(torch.zeros(4, 16))
    assert (w_scale > 0).all() and (w_fp8.float() == 0).all()


def test_blockwise_scales_cover_partial_blocks():
    w = torch.randn(200, 300)
    w[150, 290] = 50.0  # lives in block (1, 2), a partial block in both dims
    w_fp8, scale = quantize_blockwise(w, (128, 128))
    assert scale.shape == (2, 3)
    torch.testing.assert_close(scale[1, 2], torch.tensor(50.0 / E4M3_MAX))
    assert scale[0, 0] < scale[1, 2]
    rel = (dequantize(w_fp8, scale, (128, 128)) - w).abs().max()
    assert rel <= E4M3_HALF_ULP * 50.0
    x_fp8, x_scale = quantize_blockwise(torch.randn(7, 300), (1, 128))
    assert x_scale.shape == (7, 3) and x_fp8.shape == (7, 300)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_rowwise_matches_float64_reference(out_dtype):
    torch.manual_seed(1)
    x_fp8, x_scale = quantize_per_token(torch.randn(33, 96))
    w_fp8, w_scale = quantize_per_channel(torch.randn(48, 96))
    out = scaled_mm_rowwise(x_fp8, x_scale, w_fp8, w_scale, out_dtype)
    ref = scaled_mm_reference(x_fp8, x_scale, w_fp8, w_scale)
    assert out.dtype == out_dtype and out.shape == (33, 48)
    # FP32 accumulation: only the output rounding (bf16: 2^-8 relative) separates the two.
    tol = 1e-5 if out_dtype == torch.float32 else 2.0**-8
    assert ((out.double() - ref).abs() / ref.abs().amax()).max() <= tol


def test_scaled_mm_blockwise_matches_float64_reference():
    torch.manual_seed(2)
    x_fp8, x_scale = quantize_blockwise(torch.randn(20, 272), (1, 128))
    w_fp8, w_scale = quantize_blockwise(torch.randn(144, 272), (128, 128))
    out = scaled_mm_blockwise(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    ref = scaled_mm_reference(x_fp8, x_scale, w_fp8, w_scale, block=128)
    # FP32 accumulation over K: errors of a few fp32 ulps of the largest output.
    assert ((out.double() - ref).abs() / ref.abs().amax()).max() <= 1e-5


@pytest.mark.parametrize(
    "weight,activation", [("per_channel", "per_token"), ("per_channel", "per_tensor"), ("block", "block")]
)
def test_fp8_linear_equals_quantize_dequantize_matmul(weight, activation):
    lin = _linear(48, 160)
    x = torch.randn(4, 6, 160)
    input_scale = x.abs().max() / E4M3_MAX
    layer = FP8Linear.from_linear(lin, weight, activation, input_scale=input_scale, name="blocks.0.ffn.w1")
    # The float64 reference: quantize both operands the way the recipe says, dequantize, multiply.
    x2 = x.reshape(-1, 160)
    if activation == "per_token":
        xq, xs = quantize_per_token(x2)
        xd = xq.double() * xs.double()
    elif activation == "per_tensor":
        xd = quantize_per_tensor(x2, input_scale).double() * input_scale.double()
    else:
        xq, xs = quantize_blockwise(x2, (1, 128))
        xd = dequantize(xq, xs, (1, 128)).double()
    ref = (xd @ layer.dequantized_weight().double().t()).reshape(4, 6, 48)
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (4, 6, 48)
    assert ((out.double() - ref).abs() / ref.abs().amax()).max() <= 1e-5
    # bf16 in -> bf16 out; the same product as the fp32 path on the bf16-rounded input, rounded once.
    x_bf16 = x.bfloat16()
    out_bf16, out_fp32 = layer(x_bf16), layer(x_bf16.float())
    assert out_bf16.dtype == torch.bfloat16
    assert ((out_bf16.double() - out_fp32.double()).abs() / out_fp32.abs().amax()).max() <= 2.0**-8
    # And the whole thing stays close to the high-precision layer (E4M3 on both operands).
    exact = x.double() @ lin.weight.double().t()
    assert ((out.double() - exact).norm() / exact.norm()) < 0.06


def test_fp8_linear_buffers_match_the_contract():
    layer = FP8Linear.from_linear(_linear(32, 64), name="x")
    buffers = dict(layer.named_buffers())
    assert buffers["weight_fp8"].dtype == E4M3 and buffers["weight_fp8"].shape == (32, 64)
    assert buffers["weight_scale"].dtype == torch.float32 and buffers["weight_scale"].shape == (32,)


def test_nan_or_inf_weights_raise_naming_the_layer():
    lin = _linear(16, 16)
    with torch.no_grad():
        lin.weight[2, 3] = float("nan")
    with pytest.raises(UserError, match=r"blocks\.1\.self_o"):
        FP8Linear.from_linear(lin, name="blocks.1.self_o")
    with torch.no_grad():
        lin.weight[2, 3] = float("inf")
    with pytest.raises(UserError, match=r"blocks\.1\.self_o"):
        FP8Linear.from_linear(lin, "block", "block", name="blocks.1.self_o")


def test_rowwise_fallback_for_cpu_builds_without_rowwise_scaled_mm(monkeypatch):
    """torch 2.11's CPU _scaled_mm takes per-tensor scales only: the fallback computes the same product."""
    from onerec.quant import fp8

    x_fp8, x_scale = fp8.quantize_per_token(torch.randn(32, 64))
    w_fp8, w_scale = fp8.quantize_per_channel(torch.randn(48, 64))
    fused = fp8.scaled_mm_rowwise(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    monkeypatch.setattr(fp8, "cpu_has_rowwise_scaled_mm", lambda: False)
    fallback = fp8.scaled_mm_rowwise(x_fp8, x_scale, w_fp8, w_scale, torch.float32)
    torch.testing.assert_close(fallback, fused, rtol=1e-5, atol=1e-5)
