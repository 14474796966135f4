"""Triton kernels of the serving ops (CUDA), one program per row: rows are a few thousand wide, so
one block holds a row. Imported only when a module's kernel is "triton". Each kernel's PyTorch
reference is in onerec/kernels/reference.py; the entries that choose between them in onerec/kernels/__init__.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from onerec.quant.fp8 import AMAX_MIN, E4M3, E4M3_MAX


@triton.jit
def store_row(y, out_ptr, scale_ptr, row, cols, mask, N, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
              SCALE_MIN: tl.constexpr):
    """One row y (fp32) -> out[row] in out's dtype, or in FP8 with its per-row scale."""
    if QUANT:
        amax = tl.max(tl.abs(y), axis=0)
        scale = tl.maximum(amax, SCALE_MIN) / FP8_MAX
        q = tl.clamp(y / scale, -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + row * N + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


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
    store_row(y, out_ptr, scale_ptr, row, cols, mask, N, QUANT, FP8_MAX, SCALE_MIN)

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
    store_row(y, out_ptr, scale_ptr, row, cols, mask, H, QUANT, FP8_MAX, SCALE_MIN)

@triton.jit
def quantize_kernel(
    x_ptr, out_ptr, scale_ptr, N, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, SCALE_MIN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    y = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    store_row(y, out_ptr, scale_ptr, row, cols, mask, N, True, FP8_MAX, SCALE_MIN)

@triton.jit
def self_attention_kernel(
    cur_ptr, first_ptr, mid_ptr, rows0_ptr, rows1_ptr, out_ptr, H, scale,
    T: tl.constexpr, HP: tl.constexpr, DH: tl.constexpr,
):
    # One program per beam row, all heads: token T's query against tokens 0..T of its beam.
    r = tl.program_id(0).to(tl.int64)
    b = tl.load(rows0_ptr + r)
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
        row1 = tl.load(rows1_ptr + r)
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


_FP8_CONSTANTS = dict(FP8_MAX=E4M3_MAX, SCALE_MIN=AMAX_MIN)


def _launch_params(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def _outputs(rows: int, n: int, like: torch.Tensor, quantize: bool):
    if quantize:
        return (
            torch.empty(rows, n, dtype=E4M3, device=like.device),
            torch.empty(rows, 1, dtype=torch.float32, device=like.device),
        )
    return torch.empty(rows, n, dtype=like.dtype, device=like.device), None


def rmsnorm(x, weight, eps, residual, quantize):
    shape = x.shape
    N = shape[-1]
    if residual is None:
        x = x.contiguous()  # e.g. a chunk of the context projection; nothing is written back
    elif not x.is_contiguous() or not residual.is_contiguous():
        raise ValueError("rmsnorm: x and residual must be contiguous (x + residual is written back into x)")
    rows = x.numel() // N
    out, scale = _outputs(rows, N, x, quantize)
    block, warps = _launch_params(N)
    rmsnorm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out, scale if quantize else out, N, eps,
        HAS_RES=residual is not None, QUANT=quantize, BLOCK=block, num_warps=warps, **_FP8_CONSTANTS,
    )
    if quantize:
        return x, out.view(*shape), scale.view(*shape[:-1], 1)
    return x, out.view(*shape)


def silu_mul(gate_up, quantize):
    shape = gate_up.shape
    H = shape[-1] // 2
    gate_up = gate_up.contiguous()
    rows = gate_up.numel() // (2 * H)
    out, scale = _outputs(rows, H, gate_up, quantize)
    block, warps = _launch_params(H)
    silu_mul_kernel[(rows,)](gate_up, out, scale if quantize else out, H, QUANT=quantize, BLOCK=block, num_warps=warps, **_FP8_CONSTANTS)
    if quantize:
        return out.view(*shape[:-1], H), scale.view(*shape[:-1], 1)
    return out.view(*shape[:-1], H)


def quantize_rows(x):
    shape = x.shape
    N = shape[-1]
    x = x.contiguous()
    rows = x.numel() // N
    out, scale = _outputs(rows, N, x, True)
    block, warps = _launch_params(N)
    quantize_kernel[(rows,)](x, out, scale, N, BLOCK=block, num_warps=warps, **_FP8_CONSTANTS)
    return out.view(*shape), scale.view(*shape[:-1], 1)


def cached_self_attention(qkv, past, rows):
    R, _, H, dh = qkv.shape
    t = len(past)
    if t not in (1, 2) or not qkv.is_contiguous() or not all(p.is_contiguous() for p in past):
        raise ValueError("cached_self_attention: 1 or 2 earlier tokens, contiguous q|k|v rows")
    out = torch.empty(R, H * dh, dtype=qkv.dtype, device=qkv.device)
    rows = [r.contiguous() for r in rows]  # read as flat int64 arrays
    mid, rows1 = (past[1], rows[1]) if t == 2 else (qkv, rows[0])
    self_attention_kernel[(R,)](
        qkv, past[0], mid, rows[0], rows1, out, H, 1.0 / dh**0.5, T=t, HP=triton.next_power_of_2(H), DH=dh,
        num_warps=4,
    )
    return out
