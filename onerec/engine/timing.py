"""Timing on a CUDA device: calls timed with device events, percentiles, matmul peaks, the FLOP
model of a request, and a random semantic-id table and requests to time with. Used by the latency gate
(onerec/engine/latency_gate.py) and the benchmark (bench/gpu_bench.py).
"""

from __future__ import annotations

import math


def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call, device events around each call, after warm-up."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def matmul_peaks(device, n: int = 8192) -> dict:
    """bf16 and FP8 (row-wise scaled) matmul TFLOP/s on this GPU, random data, median of repeats."""
    import torch

    from onerec.quant.fp8 import quantize_per_channel, quantize_per_token, scaled_mm_rowwise

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    flops = 2 * n**3
    bf16 = time_calls(lambda: a @ b.t(), 3, 15)
    a8, sa = quantize_per_token(a)
    b8, sb = quantize_per_channel(b)
    fp8 = time_calls(lambda: scaled_mm_rowwise(a8, sa, b8, sb), 3, 15)
    return {
        "shape": [n, n, n],
        "bf16_tflops": flops / percentile(bf16, 0.5) / 1e9,
        "fp8_tflops": flops / percentile(fp8, 0.5) / 1e9,
    }


def flop_count(cfg, context_len: int, beams: list[int], cached: bool = True) -> dict:
    """FLOPs per user of one request (context + all steps); `cached=False`: a search that re-runs the
    whole target prefix every step (`beam_search(..., use_cache=False)`)."""
    d, inner, V = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.codebook_size
    T = context_len + 1  # + the user token
    if cfg.n_routed_experts:
        ffn_macs = [
            (3 * d * cfg.expert_hidden * (cfg.moe_top_k + cfg.n_shared_experts) + d * cfg.n_routed_experts)
            if cfg.is_moe_layer(l) else 3 * d * cfg.ffn_hidden for l in range(cfg.n_layers)
        ]
    else:
        ffn_macs = [3 * d * cfg.ffn_hidden] * cfg.n_layers
    linear_per_row = sum(2 * (6 * d * inner + f) for f in ffn_macs)
    attn_per_row = cfg.n_layers * 4 * inner * T
    rows_in = [1, *beams[:-1]]  # beams entering step t
    rows = [r if cached else r * (t + 1) for t, r in enumerate(rows_in)]
    linear = sum(rows) * linear_per_row + T * 2 * d * cfg.d_context
    attention = sum(rows) * attn_per_row
    heads = sum(rows_in) * 2 * d * V
    return {"linear": linear, "attention": attention, "heads": heads, "total": linear + attention + heads}


def random_requests(cfg, batch: int, context_len: int, table, seed: int, device):
    """Histories of `context_len` known items (no padding: the serving case at context 3000)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(table), (batch, context_len))
    sids = torch.from_numpy(table[ids].astype(np.int64)).to(device)
    mask = torch.ones(batch, context_len, dtype=torch.bool, device=device)
    return sids, mask


def random_index(num_items: int, codebook_size: int, n_levels: int, seed: int):
    """A random table of `num_items` unique code triples and its prefix index."""
    import numpy as np

    from onerec.semantic_ids import SemanticIdIndex

    rng = np.random.default_rng(seed)
    table = np.unique(rng.integers(0, codebook_size, (int(num_items * 1.01) + 16, n_levels)), axis=0)
    table = rng.permutation(table)[:num_items].astype(np.int32)
    return table, SemanticIdIndex.build(table, codebook_size)
