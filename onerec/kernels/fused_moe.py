"""The MoE layer as one op: routing, permutation and grouped expert GEMMs, no host sync.

`kernels.moe(x, weights, kernel)` (onerec/kernels/__init__.py) computes what the model's MoE module
computes (top-k routed SwiGLU experts, renormalised gates, plus the shared expert) on experts
stacked once (`MoEWeights.from_experts`, called by the engine's conversion: onerec/engine/layers.py),
organised for the GPU. This module holds the weights, the routing plan and the PyTorch reference;
onerec/kernels/triton_fused_moe.py the Triton kernels.

1. route: router GEMM, softmax, top-k, renormalise (the module's own math);
2. plan (`plan_routes`; the Triton kernel computes the same plan): the (token, slot) pairs are
   sorted by expert; per-expert row offsets, a tile -> expert map and each tile's row range stay
   on the device. Shapes are static (a grid of cdiv(pairs, BLOCK_M) + experts tiles, the unused
   ones exit at once), so no `.tolist()` and the whole layer can sit inside a CUDA graph. The
   shared expert, when its width equals a routed expert's, is one more "expert" that every token
   visits with gate 1: same pass, no extra launch;
3. `gate_up` grouped GEMM: each program finds its expert from the tile map, gathers its token rows
   of x (no permuted copy of x), multiplies by w1[e] and w3[e] and writes SiLU(gate) * up; for FP8
   it also quantizes that output in 1x128 blocks (the activation blocks of the next GEMM);
4. `down` grouped GEMM over the sorted rows, multiplied by each pair's gate in the epilogue;
5. combine: each token sums its k (+ shared) rows in FP32 (deterministic, no atomics).

bf16 and FP8 with the `fp8_block` recipe's scales (1x128 activation blocks, 128x128 weight
blocks: `onerec.quant.fp8.quantize_blockwise`). Intermediate roundings follow the module's bf16 ops
(gate, up, SiLU, product and expert output rounded to the model dtype), so the reference below
equals the module up to FP32 summation order.

`Kernel.TORCH`: `moe_reference`, plain PyTorch on any device (it syncs with the host once per call
for the expert loop); `Kernel.TRITON`: the grouped kernels in onerec/kernels/triton_fused_moe.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onerec.quant.fp8 import BLOCK, FP8Linear, dequantize, quantize_blockwise


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
    def from_experts(cls, router: torch.Tensor, experts: Sequence[nn.Module], shared: nn.Module | None,
                     top_k: int, fp8: bool | None = None) -> MoEWeights | None:
        """Stack the SwiGLU `experts` (each with w1, w3, w2 layers) and the `shared` one; None when
        they cannot share one grouped GEMM (mixed formats). router [n_routed, d]: the router's weight.

        fp8 None: as the experts are (nn.Linear -> bf16, FP8Linear with block scales -> FP8);
        True: bf16 experts are quantized here with 128x128 blocks.
        """
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
            router=router.detach(), w1=stack(0), w1_scale=stack(1), w3=stack(2), w3_scale=stack(3),
            w2=stack(4), w2_scale=stack(5), top_k=top_k, n_routed=len(experts), shared_folded=fold,
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
    """x [N, d] -> (gates [N, k] fp32, renormalised, experts [N, k]): the model MoE's routing math."""
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
