"""Triton kernels of the MoE op (entry `onerec.kernels.moe`; plan and PyTorch reference in
onerec/kernels/fused_moe.py): the routing plan in three launches, the gate|up and down grouped
GEMMs (bf16, or FP8 with block scales), the FP32 combine, and the 1x128 block quantization of x;
and their launch configs.

Launch configs (`moe_config`), the way vLLM keeps them: a table per device,
configs/fused_moe_<device>.json (written by bench/tune_fused_moe.py), holds for each expert shape and
format (bf16 | fp8) a config per token count; the nearest token count is used. A device or shape
without a table gets `default_config`'s heuristic. A config is BLOCK_M (shared by both GEMMs: the
routing plan tiles the rows by it) and, per kernel (gate_up, down), BLOCK_N, BLOCK_K, num_warps and
num_stages (FP8: BLOCK_N == BLOCK_K == 128, the weight blocks). Every config, from a table, the
heuristic or a caller, is fitted to the device's shared memory before launch (`fit_shared_memory`).

The kernels are defined on first use (`_kernels()`, cached), not at import: Triton decides at
definition time whether a kernel is compiled or run by its CPU interpreter (TRITON_INTERPRET=1),
and the tests run these on CPU through the interpreter (tests/triton_interpreter.py).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from onerec.kernels.fused_moe import MoEWeights, RoutePlan
from onerec.quant.fp8 import AMAX_MIN, BLOCK, E4M3, E4M3_MAX


def moe(x: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor, w: MoEWeights,
        config: dict | None = None) -> torch.Tensor:
    """The routed (+ folded shared) experts of x [N, d] routed as (gates, experts) [N, k] -> [N, d]."""
    cfg = moe_config(x.shape[0], w, x.device, config)
    plan = plan_routes(gates, experts, w.w1.shape[0], w.shared_folded, cfg["BLOCK_M"])
    return grouped_experts(x, plan, w, cfg)


# ---------------------------------------------------------------------------------------------
# launch configs

CONFIG_DIR = Path(__file__).parent / "configs"
KERNELS = ("gate_up", "down")
KERNEL_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
# Shared memory per block (opt-in) of sm_90: the limit assumed where the device is not CUDA
# (Triton's interpreter, CPU tests) and what the tables are checked against.
HOPPER_SHARED_MEMORY = 232448
# Beyond the pipelined tiles: mbarriers and alignment. Compiled for sm_90 (Triton 3.6), the kernels
# use at most num_stages x (x tile + weight tiles) bytes; their epilogue scratch reuses that space.
SHARED_MEMORY_MARGIN = 1024
MIN_BLOCK = 32  # the smallest BLOCK_K / BLOCK_N the fit goes down to (tl.dot needs >= 16)


def default_config(pairs: int, n_experts: int, fp8: bool) -> dict:
    """The heuristic config by rows per expert (decode batches put ~30-900 rows on each expert)."""
    per_expert = pairs / n_experts
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64 if per_expert <= 256 else 128
    kernel = dict(BLOCK_N=128, BLOCK_K=128, num_warps=4 if block_m <= 64 else 8, num_stages=3)
    return {"BLOCK_M": block_m, "gate_up": dict(kernel), "down": dict(kernel)}


def device_slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia_h200": the device part of a table's file name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@functools.cache
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def table_path(name: str) -> Path:
    return CONFIG_DIR / f"fused_moe_{device_slug(name)}.json"


def shape_key(w: MoEWeights) -> str:
    """The table key of an expert shape: experts (with the folded shared one), slots per token, d_model, hidden."""
    E, I, D = w.w1.shape
    return f"experts={E},slots={w.top_k + w.shared_folded},d_model={D},hidden={I}"


def format_key(w: MoEWeights) -> str:
    return "fp8" if w.fp8 else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(w.w1.dtype, "fp32")


def element_bytes(w: MoEWeights) -> int:
    """Bytes of one element of the GEMMs' operand tiles (FP8: x and h are quantized to 1 byte)."""
    return 1 if w.fp8 else w.w1.element_size()


@functools.cache
def load_table(name: str) -> dict:
    """{shape key: {format: {tokens (int): config}}} of device `name`; {} without a table file."""
    path = table_path(name)
    if not path.exists():
        return {}
    try:
        configs = json.loads(path.read_text())["configs"]
        return {shape: {fmt: {int(tokens): check_config(cfg) for tokens, cfg in by_tokens.items()}
                        for fmt, by_tokens in formats.items()} for shape, formats in configs.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a fused MoE config table ({type(exc).__name__}: {exc})") from None


def check_config(cfg: dict) -> dict:
    """`cfg` if it has BLOCK_M and, per kernel, positive ints BLOCK_N, BLOCK_K, num_warps, num_stages."""
    values = [cfg["BLOCK_M"], *(cfg[k][key] for k in KERNELS for key in KERNEL_KEYS)]
    if not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"config values must be positive integers: {cfg}")
    return {"BLOCK_M": cfg["BLOCK_M"], **{k: {key: cfg[k][key] for key in KERNEL_KEYS} for k in KERNELS}}


def table_config(tokens: int, w: MoEWeights, name: str) -> dict | None:
    """The table's config of the token count nearest `tokens` (the smaller on a tie), or None."""
    by_tokens = load_table(name).get(shape_key(w), {}).get(format_key(w))
    if not by_tokens:
        return None
    nearest = min(sorted(by_tokens), key=lambda t: abs(t - tokens))
    return by_tokens[nearest]


def merge_config(cfg: dict, override: dict | None) -> dict:
    """`cfg` with `override`'s values: BLOCK_M, per-kernel dicts (gate_up, down), and kernel keys
    given at the top level (BLOCK_N, BLOCK_K, num_warps, num_stages), which apply to both kernels."""
    override = override or {}
    out = {"BLOCK_M": override.get("BLOCK_M", cfg["BLOCK_M"])}
    for kernel in KERNELS:
        out[kernel] = {**cfg[kernel], **override.get(kernel, {}),
                       **{key: override[key] for key in KERNEL_KEYS if key in override}}
    return out


@functools.cache
def shared_memory_limit(device: torch.device) -> int:
    """Shared memory per block (opt-in) of `device`; HOPPER_SHARED_MEMORY off CUDA."""
    if device.type != "cuda":
        return HOPPER_SHARED_MEMORY
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def shared_memory_bytes(kernel: str, block_m: int, kcfg: dict, elem_bytes: int) -> int:
    """Estimate of a kernel's shared memory: its pipelined tiles (gate_up loads an x tile and the w1, w3
    tiles per stage; down an h tile and a w2 tile) times the stages, plus SHARED_MEMORY_MARGIN."""
    weight_tiles = 2 if kernel == "gate_up" else 1
    tiles = (block_m + weight_tiles * kcfg["BLOCK_N"]) * kcfg["BLOCK_K"] * elem_bytes
    return kcfg["num_stages"] * tiles + SHARED_MEMORY_MARGIN


def fit_shared_memory(cfg: dict, fp8: bool, elem_bytes: int, limit: int) -> dict:
    """`cfg` reduced, per kernel, until its shared memory fits `limit`: fewer stages (down to 2), then
    (not FP8, whose tiles are the 128 x 128 weight blocks) halving BLOCK_K, then BLOCK_N, then 1 stage."""
    out = {"BLOCK_M": cfg["BLOCK_M"]}
    for kernel in KERNELS:
        k = dict(cfg[kernel])
        while shared_memory_bytes(kernel, cfg["BLOCK_M"], k, elem_bytes) > limit:
            if k["num_stages"] > 2:
                k["num_stages"] -= 1
            elif not fp8 and k["BLOCK_K"] > MIN_BLOCK:
                k["BLOCK_K"] //= 2
            elif not fp8 and k["BLOCK_N"] > MIN_BLOCK:
                k["BLOCK_N"] //= 2
            elif k["num_stages"] > 1:
                k["num_stages"] = 1
            else:
                raise ValueError(f"moe: no {kernel} config with BLOCK_M={cfg['BLOCK_M']} fits {limit} bytes "
                                 f"of shared memory")
        out[kernel] = k
    return out


def moe_config(tokens: int, w: MoEWeights, device: torch.device, override: dict | None = None) -> dict:
    """The launch config of `tokens` tokens through `w` on `device` (`choose_config` for its table and limit)."""
    return choose_config(tokens, w, device_name(device), shared_memory_limit(device), override)


def choose_config(tokens: int, w: MoEWeights, name: str | None, limit: int, override: dict | None = None) -> dict:
    """Device `name`'s table config (nearest token count; name None: no table) or the heuristic, with
    `override`'s values, fitted to `limit` bytes of shared memory."""
    cfg = (name and table_config(tokens, w, name)) or default_config(tokens * (w.top_k + w.shared_folded), w.w1.shape[0], w.fp8)
    cfg = merge_config(cfg, override)
    if w.fp8 and any(cfg[k]["BLOCK_N"] != BLOCK or cfg[k]["BLOCK_K"] != BLOCK for k in KERNELS):
        raise ValueError("moe: the FP8 block kernels need BLOCK_N == BLOCK_K == 128")
    return fit_shared_memory(cfg, w.fp8, element_bytes(w), limit)


@functools.cache
def _kernels():
    # Triton resolves a kernel's callees among its module's globals (a closure is not seen).
    global expert_rows
    import triton
    import triton.language as tl

    @triton.jit
    def expert_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, N_EXPERTS, BLOCK_M: tl.constexpr):
        # This program's tile: its expert (N_EXPERTS marks an unused tile of the static grid) and
        # its rows of the expert-sorted pairs, masked at the expert's end.
        tile = tl.program_id(0)
        e = tl.load(tile_expert_ptr + tile)
        row0 = tl.load(tile_row_ptr + tile)
        row_end = tl.load(offsets_ptr + tl.minimum(e, N_EXPERTS - 1) + 1)
        rows = row0 + tl.arange(0, BLOCK_M)
        return e, rows, rows < row_end

    @triton.jit
    def gate_up_kernel(
        x_ptr, xs_ptr, w1_ptr, w3_ptr, w1s_ptr, w3s_ptr, h_ptr, hs_ptr,
        token_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
        K, I, KB, IB, N_EXPERTS,
        FP8: tl.constexpr, IEEE: tl.constexpr, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr, SCALE_MIN: tl.constexpr,
    ):
        # h[r] = SiLU(x[token[r]] W1[e]^T) * (x[token[r]] W3[e]^T) for the rows r of tile t.
        pid_n = tl.program_id(1)
        e, rows, rmask = expert_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, N_EXPERTS, BLOCK_M)
        if e >= N_EXPERTS:
            return
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
        pid_n = tl.program_id(1)
        e, rows, rmask = expert_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, N_EXPERTS, BLOCK_M)
        if e >= N_EXPERTS:
            return
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


def plan_routes(gates: torch.Tensor, experts: torch.Tensor, n_experts: int, shared: bool, block_m: int,
                       block: int = 256) -> RoutePlan:
    """`onerec.kernels.fused_moe.plan_routes` in three Triton launches (identical result: the same stable order)."""
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


def grouped_experts(x: torch.Tensor, plan: RoutePlan, w: MoEWeights, cfg: dict) -> torch.Tensor:
    """The routed (+ folded shared) experts through the grouped Triton kernels: x [N, d] -> [N, d].
    `cfg`: a fitted config (`moe_config`) with the plan's BLOCK_M."""
    combine = _kernels()[2]
    N, D = x.shape
    x = x.contiguous()
    x_in, x_scale = quantize_blocks(x) if w.fp8 else (x, None)
    h, h_scale = gate_up(x_in, x_scale, plan, w, cfg["gate_up"], x.dtype)
    y = down(h, h_scale, plan, w, cfg["down"], x.dtype)
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    block = min(1024, 1 << (D - 1).bit_length())
    combine[(N, triton_cdiv(D, block))](y, plan.inverse, out, D, SLOTS=plan.inverse.shape[1], BLOCK=block)
    return out


def gate_up(x: torch.Tensor, x_scale: torch.Tensor | None, plan: RoutePlan, w: MoEWeights, kcfg: dict,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate|up grouped GEMM, one launch: x [N, d] (FP8: quantized, with its 1x128 scales) ->
    h [M, I] = SiLU(x W1^T) * (x W3^T) in the plan's sorted rows, rounded as `dtype` (the model's);
    FP8: h quantized, with its 1x128 scales. kcfg: BLOCK_N, BLOCK_K, num_warps, num_stages."""
    E, I, D = w.w1.shape
    M = plan.token.shape[0]
    if w.fp8:
        h = torch.empty(M, I, dtype=E4M3, device=x.device)
        h_scale = torch.empty(M, -(-I // BLOCK), dtype=torch.float32, device=x.device)
    else:
        h, h_scale = torch.empty(M, I, dtype=dtype, device=x.device), None
    _kernels()[0][(plan.tile_expert.shape[0], triton_cdiv(I, kcfg["BLOCK_N"]))](
        x, _or(x_scale, x), w.w1, w.w3, _or(w.w1_scale, x), _or(w.w3_scale, x), h, _or(h_scale, x),
        plan.token, plan.tile_expert, plan.tile_row, plan.offsets, D, I, -(-D // BLOCK), -(-I // BLOCK), E,
        FP8=w.fp8, IEEE=dtype == torch.float32, DTYPE=_TL_DTYPES[dtype], BLOCK_M=plan.block_m, **kcfg,
        **_FP8_CONSTANTS,
    )
    return h, h_scale


def down(h: torch.Tensor, h_scale: torch.Tensor | None, plan: RoutePlan, w: MoEWeights, kcfg: dict,
         dtype: torch.dtype) -> torch.Tensor:
    """The down grouped GEMM, one launch: h [M, I] (the plan's sorted rows) -> y [M, d] = gate * (h W2^T),
    in `dtype`. kcfg: BLOCK_N, BLOCK_K, num_warps, num_stages."""
    E, D, I = w.w2.shape
    M = plan.token.shape[0]
    y = torch.empty(M, D, dtype=dtype, device=h.device)
    _kernels()[1][(plan.tile_expert.shape[0], triton_cdiv(D, kcfg["BLOCK_N"]))](
        h, _or(h_scale, y), w.w2, _or(w.w2_scale, y), y, plan.gate, plan.tile_expert, plan.tile_row, plan.offsets,
        D, I, -(-I // BLOCK), -(-D // BLOCK), E, FP8=w.fp8, IEEE=dtype == torch.float32, BLOCK_M=plan.block_m,
        **kcfg,
    )
    return y


def _or(t, default):
    return t if t is not None else default


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
