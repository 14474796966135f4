"""The MoE layer as grouped GEMMs: routing, permutation and expert work on the device, no host sync.

`moe(x, weights, kernel)` computes exactly what `onerec.model.MoE.forward` computes (top-k routed
SwiGLU experts, renormalised gates, plus the shared expert), organised for the GPU:

1. route: router GEMM, softmax, top-k, renormalise (the module's own math, `MoE.route`);
2. plan (`plan_routes`, `plan_routes_triton`): the (token, slot) pairs are sorted by expert; per-expert row offsets,
   a tile -> expert map and each tile's row range stay on the device. Shapes are static (a grid of
   cdiv(pairs, BLOCK_M) + experts tiles, the unused ones exit at once), so no `.tolist()` and the
   whole layer can sit inside a CUDA graph. The shared expert, when its width equals a routed
   expert's, is one more "expert" that every token visits with gate 1: same pass, no extra launch;
3. `gate_up` grouped GEMM: each program finds its expert from the tile map, gathers its token rows
   of x (no permuted copy of x), multiplies by w1[e] and w3[e] and writes SiLU(gate) * up; for FP8
   it also quantizes that output in 1x128 blocks (the activation blocks of the next GEMM);
4. `down` grouped GEMM over the sorted rows, multiplied by each pair's gate in the epilogue;
5. combine: each token sums its k (+ shared) rows in FP32 (deterministic, no atomics).

bf16 and FP8 with the `fp8_block` recipe's scales (1x128 activation blocks, 128x128 weight
blocks: `onerec.quant.fp8.quantize_blockwise`). Intermediate roundings follow the module's bf16 ops
(gate, up, SiLU, product and expert output rounded to the model dtype), so the reference below
equals the module up to FP32 summation order.

`moe_reference` is the same op in plain PyTorch (CPU path and tests); `kernel="triton"` runs the
Triton kernels (CUDA, or the Triton interpreter on CPU in tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onerec.model import MoE
from onerec.quant.fp8 import AMAX_MIN, BLOCK, E4M3, E4M3_MAX, FP8Linear, dequantize, quantize_blockwise


@dataclass
class MoEWeights:
    """One MoE layer's weights stacked per expert (the shared expert last when it is folded in).

    w1, w3 [E, I, d] (gate, up), w2 [E, d, I]: bf16, or FP8 with block scales w*_scale
    [E, ceil(rows/128), ceil(cols/128)]. `shared` is the shared expert module when it could not
    be folded in (different width or format): it then runs as a module after the routed experts.
    """

    router: torch.Tensor  # [n_routed, d]
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    top_k: int
    n_routed: int
    shared_folded: bool
    w1_scale: torch.Tensor | None = None
    w3_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    shared: nn.Module | None = None

    @property
    def fp8(self) -> bool:
        return self.w1_scale is not None

    @classmethod
    def from_module(cls, moe: MoE, fp8: bool | None = None) -> MoEWeights | None:
        """Stack `moe`'s experts; None when they cannot share one grouped GEMM (mixed formats).

        fp8 None: as the experts are (nn.Linear -> bf16, FP8Linear with block scales -> FP8);
        True: bf16 experts are quantized here with 128x128 blocks.
        """
        experts = list(moe.experts)
        shared = moe.shared
        stacked = [_expert_weights(e, fp8) for e in experts]
        if any(s is None for s in stacked) or len({s[0].dtype for s in stacked}) != 1:
            return None
        fold = shared is not None
        if fold:
            s = _expert_weights(shared, fp8)
            fold = s is not None and s[0].dtype == stacked[0][0].dtype and s[0].shape == stacked[0][0].shape
            if fold:
                stacked.append(s)

        def stack(i):
            parts = [s[i] for s in stacked]
            return None if parts[0] is None else torch.stack(parts)

        return cls(
            router=moe.router.weight.detach(), w1=stack(0), w1_scale=stack(1), w3=stack(2), w3_scale=stack(3),
            w2=stack(4), w2_scale=stack(5), top_k=moe.top_k, n_routed=len(experts), shared_folded=fold,
            shared=None if fold else shared,
        )


def _expert_weights(expert: nn.Module, fp8: bool | None):
    """(w1, w1_scale, w3, w3_scale, w2, w2_scale) of one SwiGLU expert, or None (unsupported layer)."""
    out = []
    for lin in (expert.w1, expert.w3, expert.w2):
        if isinstance(lin, FP8Linear):
            if fp8 is False or lin.weight_granularity != "block" or lin.block != BLOCK or lin.bias is not None:
                return None
            out += [lin.weight_fp8, lin.weight_scale]
        elif isinstance(lin, nn.Linear) and lin.bias is None:
            if fp8:
                out += list(quantize_blockwise(lin.weight.detach()))
            else:
                out += [lin.weight.detach(), None]
        else:
            return None
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# routing and the device-side plan (shared by the reference and the kernels)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, d] -> (gates [N, k] fp32, renormalised, experts [N, k]): `MoE.route`'s math."""
    probs = torch.softmax(F.linear(x, router.to(x.dtype)).float(), dim=-1)
    gates, experts = probs.topk(top_k, dim=-1)
    return gates / gates.sum(-1, keepdim=True), experts


@dataclass
class RoutePlan:
    """Pairs (token, slot) sorted by expert, M = tokens * slots rows; everything on x's device."""

    token: torch.Tensor  # [M] int32: token of sorted row r
    gate: torch.Tensor  # [M] fp32: gate of sorted row r (1 for the shared expert)
    inverse: torch.Tensor  # [N, slots] int64: sorted row of pair (token, slot)
    offsets: torch.Tensor  # [E + 1] int32: rows of expert e are offsets[e]:offsets[e + 1]
    tile_expert: torch.Tensor  # [tiles] int32: expert of tile t (E for an unused tile)
    tile_row: torch.Tensor  # [tiles] int32: first row of tile t
    block_m: int


def plan_routes(gates: torch.Tensor, experts: torch.Tensor, n_experts: int, shared: bool, block_m: int) -> RoutePlan:
    """Sort the routed pairs by expert and lay them out in tiles of `block_m` rows, without host syncs.

    Tiles never straddle two experts: expert e gets ceil(count_e / block_m) tiles, so the number of
    used tiles is at most cdiv(M, block_m) + E, the static grid size.
    """
    N, k = experts.shape
    device = experts.device
    if shared:  # the shared expert is expert index n_experts - 1 for every token, gate 1
        experts = torch.cat([experts, torch.full((N, 1), n_experts - 1, device=device, dtype=experts.dtype)], 1)
        gates = torch.cat([gates, torch.ones(N, 1, device=device, dtype=gates.dtype)], 1)
    slots = experts.shape[1]
    flat = experts.reshape(-1)
    M = flat.numel()
    order = flat.argsort(stable=True)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = F.pad(counts.cumsum(0), (1, 0))
    tiles = (counts + block_m - 1) // block_m
    tile_end = tiles.cumsum(0)
    n_tiles = (M + block_m - 1) // block_m + n_experts
    t = torch.arange(n_tiles, device=device)
    tile_expert = torch.searchsorted(tile_end, t, right=True)  # n_experts past the last used tile
    e = tile_expert.clamp(max=n_experts - 1)
    tile_row = offsets[e] + (t - (tile_end[e] - tiles[e])) * block_m
    inverse = torch.empty(M, dtype=torch.int64, device=device).scatter_(0, order, torch.arange(M, device=device))
    return RoutePlan(
        token=(order // slots).to(torch.int32), gate=gates.reshape(-1)[order].float(),
        inverse=inverse.view(N, slots), offsets=offsets.to(torch.int32), tile_expert=tile_expert.to(torch.int32),
        tile_row=tile_row.to(torch.int32), block_m=block_m,
    )


# ---------------------------------------------------------------------------------------------
# the op: one entry, a kernel switch


def moe(x: torch.Tensor, w: MoEWeights, kernel: str = "auto", config: dict | None = None) -> torch.Tensor:
    """MoE layer on x [..., d] -> [..., d] (same as the module). kernel: auto | torch | triton."""
    if kernel == "auto":
        kernel = "triton" if x.is_cuda else "torch"
    if kernel not in ("torch", "triton"):
        raise ValueError(f"moe: kernel must be auto, torch or triton, got {kernel!r}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    gates, experts = route(x2, w.router, w.top_k)
    n_experts = w.w1.shape[0]
    if kernel == "torch":
        out = moe_reference(x2, gates, experts, w)
    else:
        cfg = {**default_config(x2.shape[0] * (w.top_k + w.shared_folded), n_experts, w.fp8), **(config or {})}
        plan = plan_routes_triton(gates, experts, n_experts, w.shared_folded, cfg["BLOCK_M"])
        out = moe_triton(x2, plan, w, cfg)
    if w.shared is not None:
        out = out + w.shared(x2)
    return out.reshape(shape)


def moe_reference(x: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    """The routed (+ folded shared) experts in plain PyTorch, with the kernels' roundings.

    Per expert: g = x W1^T, u = x W3^T (FP32 accumulation, rounded to x's dtype), h = SiLU(g) * u
    (each op rounded), y = h W2^T (rounded), times the gate (rounded); each token sums its rows in
    FP32. FP8: x and h are quantized in 1x128 blocks and the products use the dequantized values
    (`onerec.quant.fp8.scaled_mm_blockwise`'s math).
    """
    dt = x.dtype
    n_experts = w.w1.shape[0]
    plan = plan_routes(gates, experts, n_experts, w.shared_folded, block_m=16)
    offsets = plan.offsets.tolist()
    xq = _block_dequant(x) if w.fp8 else x.float()
    y = torch.empty(plan.token.shape[0], x.shape[1], dtype=dt, device=x.device)
    for e in range(n_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        rows = xq[plan.token[lo:hi].long()]
        g = (rows @ _weight(w, "w1", e).t()).to(dt)
        u = (rows @ _weight(w, "w3", e).t()).to(dt)
        h = F.silu(g) * u
        hq = _block_dequant(h) if w.fp8 else h.float()
        out = (hq @ _weight(w, "w2", e).t()).to(dt)
        y[lo:hi] = (out.float() * plan.gate[lo:hi, None]).to(dt)
    return y[plan.inverse].float().sum(1).to(dt)


def _block_dequant(x: torch.Tensor) -> torch.Tensor:
    return dequantize(*quantize_blockwise(x, (1, BLOCK)), (1, BLOCK))


def _weight(w: MoEWeights, name: str, e: int) -> torch.Tensor:
    weight, scale = getattr(w, name)[e], getattr(w, f"{name}_scale")
    return dequantize(weight, scale[e], (BLOCK, BLOCK)) if scale is not None else weight.float()


# ---------------------------------------------------------------------------------------------
# Triton kernels


def default_config(pairs: int, n_experts: int, fp8: bool) -> dict:
    """Tile sizes by rows per expert: decode batches put ~30-900 rows on each expert."""
    per_expert = pairs / n_experts
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64 if per_expert <= 256 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, num_warps=4 if block_m <= 64 else 8, num_stages=3)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gate_up_kernel(
        x_ptr, xs_ptr, w1_ptr, w3_ptr, w1s_ptr, w3s_ptr, h_ptr, hs_ptr,
        token_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
        K, I, KB, IB, N_EXPERTS,
        FP8: tl.constexpr, IEEE: tl.constexpr, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr, SCALE_MIN: tl.constexpr,
    ):
        # h[r] = SiLU(x[token[r]] W1[e]^T) * (x[token[r]] W3[e]^T) for the rows r of tile t.
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_expert_ptr + tile)
        if e >= N_EXPERTS:
            return
        row0 = tl.load(tile_row_ptr + tile)
        row_end = tl.load(offsets_ptr + e + 1)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < I
        e64 = e.to(tl.int64)
        w_off = e64 * I * K + cols[:, None].to(tl.int64) * K
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kb = k0 // BLOCK_K
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(x_ptr + tok[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            wg = tl.load(w1_ptr + w_off + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            wu = tl.load(w3_ptr + w_off + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            if FP8:
                # 1x128 activation block scale per row, one 128x128 weight block scale per tile
                sa = tl.load(xs_ptr + tok * KB + kb, mask=rmask, other=0.0)
                sg = tl.load(w1s_ptr + (e64 * IB + pid_n * BLOCK_N // 128) * KB + kb)
                su = tl.load(w3s_ptr + (e64 * IB + pid_n * BLOCK_N // 128) * KB + kb)
                acc_g += tl.dot(a, tl.trans(wg)) * (sa[:, None] * sg)
                acc_u += tl.dot(a, tl.trans(wu)) * (sa[:, None] * su)
            elif IEEE:
                acc_g = tl.dot(a, tl.trans(wg), acc_g, input_precision="ieee")
                acc_u = tl.dot(a, tl.trans(wu), acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(a, tl.trans(wg), acc_g)
                acc_u = tl.dot(a, tl.trans(wu), acc_u)
        # the module's roundings: gate, up, SiLU and the product each rounded to the model dtype
        dt = DTYPE
        g = acc_g.to(dt).to(tl.float32)
        u = acc_u.to(dt).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        y = (s * u).to(dt).to(tl.float32)
        out_off = rows[:, None].to(tl.int64) * I + cols[None, :]
        omask = rmask[:, None] & cmask[None, :]
        if FP8:  # BLOCK_N == 128: this tile holds exactly one 1x128 block of each row
            amax = tl.max(tl.abs(y), axis=1)
            scale = tl.maximum(amax, SCALE_MIN) / FP8_MAX
            q = tl.clamp(y / scale[:, None], -FP8_MAX, FP8_MAX)
            tl.store(h_ptr + out_off, q.to(tl.float8e4nv), mask=omask)
            tl.store(hs_ptr + rows.to(tl.int64) * IB + pid_n, scale, mask=rmask)
        else:
            tl.store(h_ptr + out_off, y.to(h_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def down_kernel(
        h_ptr, hs_ptr, w2_ptr, w2s_ptr, y_ptr, gate_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
        D, I, IB, DB, N_EXPERTS,
        FP8: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # y[r] = gate[r] * (h[r] W2[e]^T) for the rows r of tile t (rows already sorted by expert).
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_expert_ptr + tile)
        if e >= N_EXPERTS:
            return
        row0 = tl.load(tile_row_ptr + tile)
        row_end = tl.load(offsets_ptr + e + 1)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < D
        e64 = e.to(tl.int64)
        w_off = e64 * D * I + cols[:, None].to(tl.int64) * I
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kb = k0 // BLOCK_K
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < I
            a = tl.load(h_ptr + rows64[:, None] * I + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(w2_ptr + w_off + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            if FP8:
                sa = tl.load(hs_ptr + rows64 * IB + kb, mask=rmask, other=0.0)
                sw = tl.load(w2s_ptr + (e64 * DB + pid_n * BLOCK_N // 128) * IB + kb)
                acc += tl.dot(a, tl.trans(wt)) * (sa[:, None] * sw)
            elif IEEE:
                acc = tl.dot(a, tl.trans(wt), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(wt), acc)
        gate = tl.load(gate_ptr + rows, mask=rmask, other=0.0)
        dt = y_ptr.dtype.element_ty
        y = acc.to(dt).to(tl.float32) * gate[:, None]
        tl.store(y_ptr + rows64[:, None] * D + cols[None, :], y.to(dt), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def combine_kernel(y_ptr, inverse_ptr, out_ptr, D, SLOTS: tl.constexpr, BLOCK: tl.constexpr):
        # out[n] = sum over its slots of y[inverse[n, j]], in FP32
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(SLOTS):
            r = tl.load(inverse_ptr + n * SLOTS + j)
            acc += tl.load(y_ptr + r * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def quantize_blocks_kernel(x_ptr, out_ptr, scale_ptr, K, KB, FP8_MAX: tl.constexpr, SCALE_MIN: tl.constexpr):
        # one program per (row, 1x128 block)
        row = tl.program_id(0).to(tl.int64)
        kb = tl.program_id(1)
        cols = kb * 128 + tl.arange(0, 128)
        mask = cols < K
        x = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), SCALE_MIN) / FP8_MAX
        q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + row * K + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row * KB + kb, scale)

    # The plan in three launches instead of ~40 small torch ops; same result as plan_routes (a stable
    # counting sort: block histograms, one scan, then each pair's row = its expert's offset + the
    # pairs of that expert in earlier blocks + those before it in its own block).
    @triton.jit
    def plan_histogram_kernel(
        experts_ptr, hist_ptr, M, SHARED_EXPERT, K_TOP: tl.constexpr, SLOTS: tl.constexpr,
        BLOCK: tl.constexpr, E_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        pairs = b * BLOCK + tl.arange(0, BLOCK)
        token = pairs // SLOTS
        slot = pairs % SLOTS  # slot K_TOP (if any) is the shared expert
        e = tl.load(experts_ptr + token * K_TOP + slot, mask=(pairs < M) & (slot < K_TOP), other=0).to(tl.int32)
        e = tl.where(slot < K_TOP, e, SHARED_EXPERT)
        onehot = ((e[:, None] == tl.arange(0, E_PAD)[None, :]) & (pairs < M)[:, None]).to(tl.int32)
        tl.store(hist_ptr + b * E_PAD + tl.arange(0, E_PAD), tl.sum(onehot, axis=0))

    @triton.jit
    def plan_scan_kernel(
        hist_ptr, base_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, N_BLOCKS, N_EXPERTS, N_TILES,
        BLOCK_M: tl.constexpr, NB_PAD: tl.constexpr, E_PAD: tl.constexpr, TILE_CHUNK: tl.constexpr,
    ):
        blocks = tl.arange(0, NB_PAD)
        ex = tl.arange(0, E_PAD)
        hist = tl.load(hist_ptr + blocks[:, None] * E_PAD + ex[None, :], mask=(blocks < N_BLOCKS)[:, None], other=0)
        before = tl.cumsum(hist, axis=0) - hist  # pairs of expert e in earlier blocks
        counts = tl.sum(hist, axis=0)
        offsets = tl.cumsum(counts, axis=0) - counts  # first row of expert e
        tl.store(base_ptr + blocks[:, None] * E_PAD + ex[None, :], offsets[None, :] + before,
                 mask=(blocks < N_BLOCKS)[:, None])
        tl.store(offsets_ptr + ex, offsets, mask=ex < N_EXPERTS)
        tl.store(offsets_ptr + N_EXPERTS, tl.sum(counts, axis=0))
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, axis=0)
        tile_start = tile_end - tiles
        for t0 in range(0, N_TILES, TILE_CHUNK):
            t = t0 + tl.arange(0, TILE_CHUNK)
            expert = tl.sum((tile_end[None, :] <= t[:, None]).to(tl.int32), axis=1)  # N_EXPERTS: unused tile
            mine = ex[None, :] == expert[:, None]
            row = tl.sum(tl.where(mine, offsets[None, :] + (t[:, None] - tile_start[None, :]) * BLOCK_M, 0), axis=1)
            tl.store(tile_expert_ptr + t, tl.minimum(expert, N_EXPERTS), mask=t < N_TILES)
            tl.store(tile_row_ptr + t, row, mask=t < N_TILES)

    @triton.jit
    def plan_scatter_kernel(
        experts_ptr, gates_ptr, base_ptr, token_ptr, gate_ptr, inverse_ptr, M, SHARED_EXPERT,
        K_TOP: tl.constexpr, SLOTS: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        pairs = b * BLOCK + tl.arange(0, BLOCK)
        valid = pairs < M
        token = pairs // SLOTS
        slot = pairs % SLOTS  # slot K_TOP (if any) is the shared expert
        e = tl.load(experts_ptr + token * K_TOP + slot, mask=(pairs < M) & (slot < K_TOP), other=0).to(tl.int32)
        e = tl.where(slot < K_TOP, e, SHARED_EXPERT)
        onehot = ((e[:, None] == tl.arange(0, E_PAD)[None, :]) & valid[:, None]).to(tl.int32)
        rank = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1), axis=1)  # earlier pairs of e in this block
        base = tl.load(base_ptr + b * E_PAD + tl.arange(0, E_PAD))
        row = tl.sum(onehot * base[None, :], axis=1) + rank
        gate = tl.load(gates_ptr + token * K_TOP + slot, mask=valid & (slot < K_TOP), other=1.0)
        tl.store(token_ptr + row, token.to(tl.int32), mask=valid)
        tl.store(gate_ptr + row, gate, mask=valid)
        tl.store(inverse_ptr + pairs, row.to(tl.int64), mask=valid)

    _TL_DTYPES.update({torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32})
    return (gate_up_kernel, down_kernel, combine_kernel, quantize_blocks_kernel, plan_histogram_kernel,
            plan_scan_kernel, plan_scatter_kernel)


_TL_DTYPES: dict = {}  # torch dtype -> Triton dtype, filled when Triton is imported


_FP8_CONSTANTS = dict(FP8_MAX=E4M3_MAX, SCALE_MIN=AMAX_MIN)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 [M, K], scales [M, ceil(K/128)]): `quantize_blockwise(x, (1, 128))` as one kernel."""
    M, K = x.shape
    KB = -(-K // BLOCK)
    out = torch.empty(M, K, dtype=E4M3, device=x.device)
    scale = torch.empty(M, KB, dtype=torch.float32, device=x.device)
    _kernels()[3][(M, KB)](x.contiguous(), out, scale, K, KB, **_FP8_CONSTANTS)
    return out, scale


def plan_routes_triton(gates: torch.Tensor, experts: torch.Tensor, n_experts: int, shared: bool, block_m: int,
                       block: int = 256) -> RoutePlan:
    """`plan_routes` in three Triton launches (identical result: the same stable order)."""
    import triton

    histogram, scan, scatter = _kernels()[4:]
    N, k = experts.shape
    slots = k + shared
    M = N * slots
    device = experts.device
    n_blocks = triton.cdiv(M, block)
    e_pad = max(16, triton.next_power_of_2(n_experts))
    n_tiles = triton.cdiv(M, block_m) + n_experts
    experts, gates = experts.contiguous(), gates.float().contiguous()
    shared_expert = n_experts - 1 if shared else n_experts  # (unused without a shared slot)
    hist = torch.empty(n_blocks, e_pad, dtype=torch.int32, device=device)
    base = torch.empty_like(hist)
    offsets = torch.empty(n_experts + 1, dtype=torch.int32, device=device)
    tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=device)
    tile_row = torch.empty(n_tiles, dtype=torch.int32, device=device)
    token = torch.empty(M, dtype=torch.int32, device=device)
    gate = torch.empty(M, dtype=torch.float32, device=device)
    inverse = torch.empty(N, slots, dtype=torch.int64, device=device)
    histogram[(n_blocks,)](experts, hist, M, shared_expert, K_TOP=k, SLOTS=slots, BLOCK=block, E_PAD=e_pad)
    scan[(1,)](hist, base, offsets, tile_expert, tile_row, n_blocks, n_experts, n_tiles, BLOCK_M=block_m,
               NB_PAD=max(16, triton.next_power_of_2(n_blocks)), E_PAD=e_pad, TILE_CHUNK=128, num_warps=8)
    scatter[(n_blocks,)](experts, gates, base, token, gate, inverse, M, shared_expert, K_TOP=k, SLOTS=slots,
                         BLOCK=block, E_PAD=e_pad)
    return RoutePlan(token, gate, inverse, offsets, tile_expert, tile_row, block_m)


def moe_triton(x: torch.Tensor, plan: RoutePlan, w: MoEWeights, cfg: dict) -> torch.Tensor:
    """The routed (+ folded shared) experts through the grouped Triton kernels: x [N, d] -> [N, d]."""
    gate_up, down, combine = _kernels()[:3]
    N, D = x.shape
    E, I, _ = w.w1.shape
    M = plan.token.shape[0]
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if w.fp8 and (BK != BLOCK or BN != BLOCK):
        raise ValueError("moe: the FP8 block kernels need BLOCK_N == BLOCK_K == 128")
    ieee = x.dtype == torch.float32
    n_tiles = plan.tile_expert.shape[0]
    x = x.contiguous()
    if w.fp8:
        x_in, x_scale = quantize_blocks(x)
        h = torch.empty(M, I, dtype=E4M3, device=x.device)
        h_scale = torch.empty(M, -(-I // BLOCK), dtype=torch.float32, device=x.device)
    else:
        x_in, x_scale = x, x
        h, h_scale = torch.empty(M, I, dtype=x.dtype, device=x.device), x
    KB, IB, DB = -(-D // BLOCK), -(-I // BLOCK), -(-D // BLOCK)
    gate_up[(n_tiles, triton_cdiv(I, BN))](
        x_in, x_scale, w.w1, w.w3, _or(w.w1_scale, x), _or(w.w3_scale, x), h, h_scale,
        plan.token, plan.tile_expert, plan.tile_row, plan.offsets, D, I, KB, IB, E,
        FP8=w.fp8, IEEE=ieee, DTYPE=_TL_DTYPES[x.dtype], **launch, **_FP8_CONSTANTS,
    )
    y = torch.empty(M, D, dtype=x.dtype, device=x.device)
    down[(n_tiles, triton_cdiv(D, BN))](
        h, h_scale, w.w2, _or(w.w2_scale, x), y, plan.gate, plan.tile_expert, plan.tile_row, plan.offsets,
        D, I, IB, DB, E, FP8=w.fp8, IEEE=ieee, **launch,
    )
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    block = min(1024, 1 << (D - 1).bit_length())
    combine[(N, triton_cdiv(D, block))](y, plan.inverse, out, D, SLOTS=plan.inverse.shape[1], BLOCK=block)
    return out


def _or(t, default):
    return t if t is not None else default


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
