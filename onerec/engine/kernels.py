"""Fused activation kernels of the engine: each produces an activation and, for FP8, quantizes it.

A separate per-token quantization pass after the op that makes an activation costs a full extra
read and write of it, which eats much of the FP8 GEMM gain (../shared/REFERENCE.md). So:

- `rmsnorm(x, weight, eps, residual=None, quantize=False)`: optionally adds the residual branch
  first (x + delta, written back: the add of the previous sublayer is fused into the next norm),
  normalises, and returns bf16 or (FP8, per-token scale);
- `silu_mul(gate_up, quantize=False)`: SiLU(gate) * up of a fused w1|w3 GEMM output;
- `quantize_rows(x)`: per-token quantization alone (attention outputs, which come out of SDPA).

Every kernel has a torch reference (`*_reference`) with the same rounding as the unfused model
ops (RMSNorm in fp32, output rounded to the model dtype, then `onerec.quant.fp8.quantize_per_token`),
so the fused result equals what the model's FP8Linear would have computed. The references run on
CPU and in tests; Triton is imported only when a CUDA tensor reaches a kernel.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from onerec.quant.fp8 import AMAX_MIN, E4M3, E4M3_MAX, quantize_per_token

# ---------------------------------------------------------------------------------------------
# torch references (CPU path, tests)


def rmsnorm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    quantize: bool = False,
):
    """Returns (x_out, y) or (x_out, y_fp8, scale); x_out = x + residual (or x), y = RMSNorm(x_out)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    if not quantize:
        return x, y
    return (x, *quantize_per_token(y))


def silu_mul_reference(gate_up: torch.Tensor, quantize: bool = False):
    """gate_up [..., 2H] = [w1 x | w3 x] -> SiLU(gate) * up [..., H] (or its FP8 + per-token scale)."""
    gate, up = gate_up.chunk(2, dim=-1)
    y = F.silu(gate) * up
    return quantize_per_token(y) if quantize else y


def cached_self_attention_reference(qkv, first, mid, parent, users: int, t: int) -> torch.Tensor:
    """Causal self-attention of target token t (t = 1, 2) over the cached tokens 0..t.

    qkv [R, 3, H, dh] of token t (R = users * beams); first [users, 3, H, dh] of BOS (token 0,
    one per user); mid [users * K1, 3, H, dh] of token 1 (t == 2 only), row of beam r's parent
    beam = user * K1 + parent[r]. Returns [R, H * dh].
    """
    R, _, H, dh = qkv.shape
    K = R // users
    user = torch.arange(R, device=qkv.device) // K
    keys, values = [first[user, 1]], [first[user, 2]]
    if t == 2:
        row = user * (mid.shape[0] // users) + parent.reshape(-1)
        keys.append(mid[row, 1])
        values.append(mid[row, 2])
    keys.append(qkv[:, 1])
    values.append(qkv[:, 2])
    k, v = torch.stack(keys, 2), torch.stack(values, 2)  # [R, H, t + 1, dh]
    out = F.scaled_dot_product_attention(qkv[:, 0, :, None], k, v)  # [R, H, 1, dh]
    return out.reshape(R, H * dh)


# ---------------------------------------------------------------------------------------------
# dispatch: Triton on CUDA, references elsewhere


def cached_self_attention(qkv, first, mid, parent, users: int, t: int) -> torch.Tensor:
    if qkv.is_cuda:
        return _triton_self_attention(qkv, first, mid, parent, users, t)
    return cached_self_attention_reference(qkv, first, mid, parent, users, t)


def rmsnorm(x, weight, eps, residual=None, quantize=False):
    if x.is_cuda:
        return _triton_rmsnorm(x, weight, eps, residual, quantize)
    return rmsnorm_reference(x, weight, eps, residual, quantize)


def silu_mul(gate_up, quantize=False):
    if gate_up.is_cuda:
        return _triton_silu_mul(gate_up, quantize)
    return silu_mul_reference(gate_up, quantize)


def quantize_rows(x):
    if x.is_cuda:
        return _triton_quantize_rows(x)
    return quantize_per_token(x)


# ---------------------------------------------------------------------------------------------
# Triton kernels (one program per row; rows are a few thousand wide, so one block holds a row)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rmsnorm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, scale_ptr, N, eps,
        HAS_RES: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
        FP8_MAX: tl.constexpr, SCALE_MIN: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row * N + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row * N + cols, x, mask=mask)  # the residual stream, updated in place
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (xf * rstd * w).to(x_ptr.dtype.element_ty).to(tl.float32)
        if QUANT:
            amax = tl.max(tl.abs(y), axis=0)
            scale = tl.maximum(amax, SCALE_MIN) / FP8_MAX
            q = tl.clamp(y / scale, -FP8_MAX, FP8_MAX)
            tl.store(out_ptr + row * N + cols, q.to(tl.float8e4nv), mask=mask)
            tl.store(scale_ptr + row, scale)
        else:
            tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def silu_mul_kernel(
        gu_ptr, out_ptr, scale_ptr, H, QUANT: tl.constexpr, BLOCK: tl.constexpr,
        FP8_MAX: tl.constexpr, SCALE_MIN: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        g = tl.load(gu_ptr + row * 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * H + H + cols, mask=mask, other=0.0).to(tl.float32)
        dt = gu_ptr.dtype.element_ty
        # Same roundings as the unfused bf16 ops: silu(g) -> bf16, then (silu * u) -> bf16.
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        y = (s * u).to(dt).to(tl.float32)
        if QUANT:
            amax = tl.max(tl.abs(y), axis=0)
            scale = tl.maximum(amax, SCALE_MIN) / FP8_MAX
            q = tl.clamp(y / scale, -FP8_MAX, FP8_MAX)
            tl.store(out_ptr + row * H + cols, q.to(tl.float8e4nv), mask=mask)
            tl.store(scale_ptr + row, scale)
        else:
            tl.store(out_ptr + row * H + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def quantize_kernel(x_ptr, out_ptr, scale_ptr, N, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, SCALE_MIN: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        y = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(y), axis=0)
        scale = tl.maximum(amax, SCALE_MIN) / FP8_MAX
        q = tl.clamp(y / scale, -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + row * N + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def self_attention_kernel(
        cur_ptr, first_ptr, mid_ptr, parent_ptr, out_ptr, K, K1, H, scale,
        T: tl.constexpr, HP: tl.constexpr, DH: tl.constexpr,
    ):
        # One program per beam row, all heads: token T's query against tokens 0..T of its beam.
        r = tl.program_id(0).to(tl.int64)
        b = r // K
        h = tl.arange(0, HP)[:, None]
        d = tl.arange(0, DH)[None, :]
        m = h < H
        HD = H * DH
        off = h * DH + d
        q = tl.load(cur_ptr + r * 3 * HD + off, mask=m, other=0.0).to(tl.float32)
        k0 = tl.load(first_ptr + b * 3 * HD + HD + off, mask=m, other=0.0).to(tl.float32)
        v0 = tl.load(first_ptr + b * 3 * HD + 2 * HD + off, mask=m, other=0.0).to(tl.float32)
        kt = tl.load(cur_ptr + r * 3 * HD + HD + off, mask=m, other=0.0).to(tl.float32)
        vt = tl.load(cur_ptr + r * 3 * HD + 2 * HD + off, mask=m, other=0.0).to(tl.float32)
        s0 = tl.sum(q * k0, axis=1) * scale
        st = tl.sum(q * kt, axis=1) * scale
        if T == 2:
            row1 = b * K1 + tl.load(parent_ptr + r)
            k1 = tl.load(mid_ptr + row1 * 3 * HD + HD + off, mask=m, other=0.0).to(tl.float32)
            v1 = tl.load(mid_ptr + row1 * 3 * HD + 2 * HD + off, mask=m, other=0.0).to(tl.float32)
            s1 = tl.sum(q * k1, axis=1) * scale
            mx = tl.maximum(tl.maximum(s0, s1), st)
            e0, e1, et = tl.exp(s0 - mx), tl.exp(s1 - mx), tl.exp(st - mx)
            out = (e0[:, None] * v0 + e1[:, None] * v1 + et[:, None] * vt) / (e0 + e1 + et)[:, None]
        else:
            mx = tl.maximum(s0, st)
            e0, et = tl.exp(s0 - mx), tl.exp(st - mx)
            out = (e0[:, None] * v0 + et[:, None] * vt) / (e0 + et)[:, None]
        tl.store(out_ptr + r * HD + off, out.to(out_ptr.dtype.element_ty), mask=m)

    return triton, rmsnorm_kernel, silu_mul_kernel, quantize_kernel, self_attention_kernel


_FP8_CONSTANTS = dict(FP8_MAX=E4M3_MAX, SCALE_MIN=AMAX_MIN)


def _launch_params(n: int) -> tuple[int, int]:
    import triton

    block = triton.next_power_of_2(n)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def _outputs(rows: int, n: int, like: torch.Tensor, quantize: bool):
    if quantize:
        return (
            torch.empty(rows, n, dtype=E4M3, device=like.device),
            torch.empty(rows, 1, dtype=torch.float32, device=like.device),
        )
    return torch.empty(rows, n, dtype=like.dtype, device=like.device), None


def _triton_rmsnorm(x, weight, eps, residual, quantize):
    kernel = _kernels()[1]
    shape = x.shape
    N = shape[-1]
    if not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        raise ValueError("rmsnorm: x and residual must be contiguous")
    rows = x.numel() // N
    out, scale = _outputs(rows, N, x, quantize)
    block, warps = _launch_params(N)
    kernel[(rows,)](
        x, residual if residual is not None else x, weight, out, scale if quantize else out, N, eps,
        HAS_RES=residual is not None, QUANT=quantize, BLOCK=block, num_warps=warps, **_FP8_CONSTANTS,
    )
    if quantize:
        return x, out.view(*shape), scale.view(*shape[:-1], 1)
    return x, out.view(*shape)


def _triton_silu_mul(gate_up, quantize):
    kernel = _kernels()[2]
    shape = gate_up.shape
    H = shape[-1] // 2
    gate_up = gate_up.contiguous()
    rows = gate_up.numel() // (2 * H)
    out, scale = _outputs(rows, H, gate_up, quantize)
    block, warps = _launch_params(H)
    kernel[(rows,)](gate_up, out, scale if quantize else out, H, QUANT=quantize, BLOCK=block, num_warps=warps, **_FP8_CONSTANTS)
    if quantize:
        return out.view(*shape[:-1], H), scale.view(*shape[:-1], 1)
    return out.view(*shape[:-1], H)


def _triton_quantize_rows(x):
    kernel = _kernels()[3]
    shape = x.shape
    N = shape[-1]
    x = x.contiguous()
    rows = x.numel() // N
    out, scale = _outputs(rows, N, x, True)
    block, warps = _launch_params(N)
    kernel[(rows,)](x, out, scale, N, BLOCK=block, num_warps=warps, **_FP8_CONSTANTS)
    return out.view(*shape), scale.view(*shape[:-1], 1)


def _triton_self_attention(qkv, first, mid, parent, users, t):
    kernel = _kernels()[4]
    import triton

    R, _, H, dh = qkv.shape
    if t not in (1, 2) or not qkv.is_contiguous() or not first.is_contiguous():
        raise ValueError("cached_self_attention: t must be 1 or 2 and qkv/first contiguous")
    out = torch.empty(R, H * dh, dtype=qkv.dtype, device=qkv.device)
    K = R // users
    K1 = mid.shape[0] // users if mid is not None else 1
    kernel[(R,)](
        qkv, first, mid if mid is not None else qkv, parent if parent is not None else qkv, out,
        K, K1, H, 1.0 / dh**0.5, T=t, HP=triton.next_power_of_2(H), DH=dh, num_warps=4,
    )
    return out
