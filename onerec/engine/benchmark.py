"""`onerec-fp8 bench`: bf16 eager vs the bf16 engine vs the FP8 engine vs torchao float8, one GPU.

Same GPU, same process, same random weights and inputs for every variant:
1. bf16-eager: plain `OneRecV2` + `onerec.generate.beam_search` (the baseline a team starts from:
   SDPA cross-attention on the shared context, a self-attention KV cache reordered by parent beam);
2. bf16-engine: `onerec.engine.Engine` without FP8 (KV cache, fused kernels, CUDA graphs);
3. fp8-engine: the same engine with FP8 GEMMs and fused activation quantization;
4. torchao-fp8: torchao `Float8DynamicActivationFloat8WeightConfig(PerRow)` on the plain
   model's decoder Linear layers + `torch.compile` of each block's decoding step, run by the plain
   beam search.

Reports p50/p99 latency per batch, requests/s, items/s (top-k items returned per second),
useful TFLOP/s and MFU against bf16 and FP8 matmul peaks measured in the same run, peak memory,
and the top-k overlap of each variant with bf16 eager. FLOPs are those of the KV-cached search,
which every variant runs. With `--trained DIR` it also measures the top-k overlap of the FP8 and
bf16 engines (and the plain search) on a trained checkpoint's real validation histories.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

from onerec.errors import UserError

log = logging.getLogger(__name__)

VARIANTS = ("bf16-eager", "bf16-engine", "fp8-engine", "torchao-fp8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="1b", help="comma-separated model presets (1b, 0.5b, 0.1b, ...)")
    parser.add_argument("--batches", default="1,8,16", help="users per batch, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--torchao-presets", default="1b",
                        help="presets that run the torchao variant (its compilation takes minutes)")
    parser.add_argument("--torchao-batches", default="",
                        help="batches that run the torchao variant (default: all); it runs after the others")
    parser.add_argument("--context-len", type=int, default=3000)
    parser.add_argument("--beam-size", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--num-items", type=int, default=1_000_000, help="items in the random semantic-id table")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget-s", type=float, default=480.0, help="skip what would start after this")
    parser.add_argument("--check-kernels", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="bench/results", help="folder for the JSON, table and plot")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--trained", default="",
                        help="folder with a trained checkpoint (ckpt/), its quantized folder (quantized/) and "
                             "data folder (data/): FP8 vs bf16 top-k overlap on its validation users")
    parser.add_argument("--trained-beams", default="64,512", help="beam sizes of the trained-checkpoint overlap")
    parser.add_argument("--sdpa-backends", default="",
                        help="SDPA backends in priority order for every variant, e.g. flash,efficient,cudnn,math "
                             "(default: torch's own choice)")


def main(args: argparse.Namespace) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise UserError("onerec-fp8 bench needs a CUDA GPU (none is visible here)")
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise UserError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    backends = [b for b in args.sdpa_backends.split(",") if b]
    with _sdpa_priority(backends):
        result = run_benchmark(
            presets=[p for p in args.presets.split(",") if p],
            batches=[int(b) for b in args.batches.split(",") if b],
            variants=variants, context_len=args.context_len, beam_size=args.beam_size, k=args.k,
            num_items=args.num_items, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
            time_budget_s=args.time_budget_s, check_kernels_first=args.check_kernels,
            torchao_presets=[p for p in args.torchao_presets.split(",") if p],
            torchao_batches=[int(b) for b in args.torchao_batches.split(",") if b] or None,
        )
        if args.trained:
            try:
                result["trained_checkpoint"] = trained_overlap(
                    Path(args.trained), [int(b) for b in args.trained_beams.split(",") if b], k=args.k)
                result["summary"]["trained_checkpoint"] = {
                    key: v for key, v in result["trained_checkpoint"].items() if key.startswith("overlap")}
            except Exception as exc:  # must not lose the benchmark's numbers
                log.exception("trained-checkpoint overlap failed")
                result["trained_checkpoint_error"] = f"{type(exc).__name__}: {exc}"[:500]
    result["settings"]["sdpa_backends"] = backends or "torch default"
    result["command"] = " ".join(["onerec-fp8", *sys.argv[1:]]) if sys.argv[0].endswith("onerec-fp8") else " ".join(sys.argv)
    paths = write_results(result, Path(args.out), args.tag)
    print(markdown_table(result), file=sys.stderr)
    return {"results": [str(p) for p in paths], "summary": result["summary"]}


def _with_sdpa(backends, fn, *args, **kwargs):
    with _sdpa_priority(backends):
        return fn(*args, **kwargs)


def choose_plain_sdpa(model, index, cfg, context_len, table, beam_size, k, seed, device, batch) -> dict:
    """The fastest SDPA backend order for the plain search, so that the baseline is fair.

    SDPA runs the plain model's cross-attention (its cached 1-query self-attention is written out
    in onerec/model.py: SDPA's default picks a slow cuDNN kernel for that shape, bench/NOTES.md);
    the plain search gets whichever order is fastest on this GPU, measured here.
    """
    from onerec.generate import beam_search

    sids, mask = random_requests(cfg, batch, context_len, table, seed, device)
    orders = {"default": [], "flash-first": ["flash", "cudnn", "efficient", "math"],
              "efficient-first": ["efficient", "flash", "cudnn", "math"], "math-first": ["math", "flash", "cudnn", "efficient"]}
    times = {}
    for name, order in orders.items():
        try:
            fn = functools.partial(_with_sdpa, order, beam_search, model, sids, mask, index, beam_size=beam_size, k=k)
            times[name] = percentile(time_calls(fn, 1, 3), 0.5)
        except Exception as exc:
            log.warning("plain SDPA order %s failed: %s", name, exc)
    best = min(times, key=times.get)
    log.info("plain search SDPA orders at batch %d (ms): %s -> %s", batch, times, best)
    return {"batch": batch, "ms": times, "chosen_name": best, "chosen": orders[best]}


def _sdpa_priority(names: list[str]):
    """A context that makes SDPA try `names` (flash, efficient, cudnn, math) in this order."""
    import contextlib

    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UserError(f"unknown SDPA backends {unknown}; known: {', '.join(table)}")
    return sdpa_kernel([table[n] for n in names], set_priority=True)


# ---------------------------------------------------------------------------------------------
# counts


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


# ---------------------------------------------------------------------------------------------
# setup


def random_index(num_items: int, codebook_size: int, n_levels: int, seed: int):
    """A random table of `num_items` unique code triples and its prefix index."""
    import numpy as np

    from onerec.semantic_ids import SemanticIdIndex

    rng = np.random.default_rng(seed)
    table = np.unique(rng.integers(0, codebook_size, (int(num_items * 1.01) + 16, n_levels)), axis=0)
    table = rng.permutation(table)[:num_items].astype(np.int32)
    return table, SemanticIdIndex.build(table, codebook_size)


def build_model(preset: str, context_len: int, device, dtype, seed: int):
    import torch

    from onerec.model import OneRecV2, OneRecV2Config

    cfg = OneRecV2Config.from_preset(preset, context_len=context_len)
    torch.manual_seed(seed)
    with torch.device(device):
        model = OneRecV2(cfg)
        # Trained-like values for the parameters that start at zero: an all-zero user token gives
        # an all-zero activation row, which per-row FP8 without a scale floor turns into NaN.
        torch.nn.init.normal_(model.context.user_token, std=0.02)
        torch.nn.init.normal_(model.bos, std=0.02)
    return model.to(dtype).eval()


def random_requests(cfg, batch: int, context_len: int, table, seed: int, device):
    """Histories of `context_len` known items (no padding: the serving case at context 3000)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(table), (batch, context_len))
    sids = torch.from_numpy(table[ids].astype(np.int64)).to(device)
    mask = torch.ones(batch, context_len, dtype=torch.bool, device=device)
    return sids, mask


# ---------------------------------------------------------------------------------------------
# measurement


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


def check_kernels(device) -> dict:
    """Triton kernels vs their torch references on fresh random inputs (bf16)."""
    import torch

    from onerec.engine import kernels
    from onerec.quant.fp8 import dequantize

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))

    checks = []
    torch.manual_seed(1234)
    for rows, n in [(1, 640), (513, 1792), (4096, 1408), (77, 4864)]:
        x = torch.randn(rows, n, device=device, dtype=torch.bfloat16) * 3
        delta = torch.randn_like(x)
        w = torch.rand(n, device=device, dtype=torch.bfloat16) + 0.5
        for quant in (False, True):
            ref = kernels.rmsnorm_reference(x.cpu(), w.cpu(), 1e-6, delta.cpu(), quant)
            got = kernels.rmsnorm(x.clone(), w, 1e-6, delta, quant)
            entry = {"kernel": "rmsnorm+residual", "quantize": quant, "rows": rows, "n": n,
                     "residual_equal": bool(torch.equal(got[0].cpu(), ref[0]))}
            if quant:
                entry["fp8_bytes_equal"] = float((got[1].cpu().view(torch.uint8) == ref[1].view(torch.uint8)).float().mean())
                entry["dequant_rel_err"] = rel(dequantize(got[1].cpu(), got[2].cpu()), dequantize(ref[1], ref[2]))
                entry["scale_rel_err"] = rel(got[2].cpu(), ref[2])
                entry["ok"] = entry["residual_equal"] and entry["dequant_rel_err"] < 1e-2 and entry["scale_rel_err"] < 1e-3
            else:
                entry["rel_err"] = rel(got[1].cpu(), ref[1])
                entry["ok"] = entry["residual_equal"] and entry["rel_err"] < 1e-2
            checks.append(entry)
        gu = torch.randn(rows, 2 * n, device=device, dtype=torch.bfloat16) * 2
        for quant in (False, True):
            ref = kernels.silu_mul_reference(gu.cpu(), quant)
            got = kernels.silu_mul(gu, quant)
            entry = {"kernel": "silu_mul", "quantize": quant, "rows": rows, "n": n}
            if quant:
                entry["fp8_bytes_equal"] = float((got[0].cpu().view(torch.uint8) == ref[0].view(torch.uint8)).float().mean())
                entry["dequant_rel_err"] = rel(dequantize(got[0].cpu(), got[1].cpu()), dequantize(*ref))
                entry["scale_rel_err"] = rel(got[1].cpu(), ref[1])
                entry["ok"] = entry["dequant_rel_err"] < 1e-2 and entry["scale_rel_err"] < 1e-3
            else:
                entry["rel_err"] = rel(got.cpu(), ref)
                entry["ok"] = entry["rel_err"] < 1e-2
            checks.append(entry)
        from onerec.quant.fp8 import quantize_per_token

        got = kernels.quantize_rows(x)
        ref = quantize_per_token(x.cpu())
        checks.append({
            "kernel": "quantize_rows", "quantize": True, "rows": rows, "n": n,
            "fp8_bytes_equal": float((got[0].cpu().view(torch.uint8) == ref[0].view(torch.uint8)).float().mean()),
            "dequant_rel_err": rel(dequantize(got[0].cpu(), got[1].cpu()), dequantize(*ref)),
        })
        checks[-1]["ok"] = checks[-1]["fp8_bytes_equal"] > 0.99 and checks[-1]["dequant_rel_err"] < 1e-2
    for users, K1, K2, H, dh in [(1, 512, 512, 14, 128), (3, 40, 64, 10, 64)]:
        first = torch.randn(users, 3, H, dh, device=device, dtype=torch.bfloat16)
        mid = torch.randn(users * K1, 3, H, dh, device=device, dtype=torch.bfloat16)
        cur = torch.randn(users * K2, 3, H, dh, device=device, dtype=torch.bfloat16)
        parent = torch.randint(0, K1, (users * K2,), device=device)
        for t, qkv, par, m in ((1, mid, None, None), (2, cur, parent, mid)):
            got = kernels.cached_self_attention(qkv, first, m, par, users, t)
            ref = kernels.cached_self_attention_reference(
                qkv.cpu().float(), first.cpu().float(), None if m is None else m.cpu().float(),
                None if par is None else par.cpu(), users, t)
            err = rel(got.cpu(), ref)
            checks.append({"kernel": "cached_self_attention", "t": t, "users": users, "heads": H, "d_head": dh,
                           "rel_err": err, "ok": err < 1e-2})
    return {"passed": all(c["ok"] for c in checks), "checks": checks}


def torchao_model(model):
    """torchao float8 dynamic activations x float8 weights, per-row scales, blocks compiled."""
    import copy

    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    qmodel = copy.deepcopy(model)
    # The same layers the engine quantizes: decoder blocks and the context projection, not the heads.
    quantize_(
        qmodel, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.startswith("heads"),
    )
    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    # dynamic=True: one compilation serves the 3 step shapes and every batch size (static shapes
    # cost 3-5 minutes of recompiles per batch size on an H100: bench/NOTES.md). The cached beam
    # search calls each block's decode_step, not its forward.
    for block in qmodel.blocks:
        block.decode_step = torch.compile(block.decode_step, dynamic=True)
    return qmodel


def trained_overlap(folder: Path, beam_sizes: list[int], k: int = 10, batch_size: int = 256, device=None) -> dict:
    """FP8 vs bf16 top-k overlap on a trained checkpoint's real validation histories.

    `folder` holds ckpt/ (onerec-fp8 train), quantized/ (onerec-fp8 quantize) and data/ (its data
    folder). Compares the FP8 engine on the quantized model with the bf16 engine and with the plain
    bf16 search, and the plain search on the quantized model (what the quality gate runs) with
    plain bf16; also recall@k of each against the validation targets.
    """
    import numpy as np
    import torch

    from onerec.checkpoint import load_checkpoint
    from onerec.data import iter_batches, load_dataset, split_leave_last_out
    from onerec.engine.engine import Engine, EngineConfig
    from onerec.evaluate import ranking_metrics
    from onerec.generate import beam_search
    from onerec.quant.export import load_quantized
    from onerec.semantic_ids import SemanticIdIndex

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, table = load_checkpoint(folder / "ckpt", device="cpu", dtype=torch.bfloat16)
    model = model.to(device)
    qmodel, _, recipe = load_quantized(folder / "quantized")
    qmodel = qmodel.to(device)
    cfg = model.cfg
    requests = split_leave_last_out(load_dataset(folder / "data"), max_history=cfg.context_len).valid
    targets = requests["target"].to_numpy(np.int64)
    index = SemanticIdIndex.build(table, cfg.codebook_size).to(device)
    out: dict = {"model": f"d_model {cfg.d_model}, {cfg.n_layers} blocks, codebook {cfg.codebook_size}, "
                          f"context {cfg.context_len}, {len(table)} items",
                 "users": len(requests), "k": k, "recipe": (recipe.get("recipe") or {}).get("name", "?"), "by_beam": {}}
    for beam in beam_sizes:
        # graphs off: the histories' lengths vary by batch; graphs do not change the numerics
        engine_cfg = EngineConfig(beam_size=beam, k=k, cuda_graphs=False)
        runs = {
            "bf16-eager": lambda b, beam=beam: beam_search(model, b.history_sids, b.history_mask, index, b.profile,
                                                            beam_size=beam, k=k),
            "fp8-eager": lambda b, beam=beam: beam_search(qmodel, b.history_sids, b.history_mask, index, b.profile,
                                                           beam_size=beam, k=k),
            "bf16-engine": Engine(model, index, engine_cfg).recommend,
            "fp8-engine": Engine(qmodel, index, engine_cfg).recommend,
        }
        items = {name: [] for name in runs}
        for batch in iter_batches(requests, table, cfg.context_len, cfg.profile_features, batch_size,
                                  categorical=cfg.categorical_features):
            b = batch.to(device)
            for name, fn in runs.items():
                recs = fn(b) if "eager" in name else fn(b.history_sids, b.history_mask, b.profile)
                items[name].append(recs.items.cpu())
        items = {name: torch.cat(v) for name, v in items.items()}
        row = {
            "overlap_fp8_engine_vs_bf16_engine": overlap(items["fp8-engine"], items["bf16-engine"]),
            "overlap_fp8_engine_vs_bf16_eager": overlap(items["fp8-engine"], items["bf16-eager"]),
            "overlap_bf16_engine_vs_bf16_eager": overlap(items["bf16-engine"], items["bf16-eager"]),
            "overlap_fp8_eager_vs_bf16_eager": overlap(items["fp8-eager"], items["bf16-eager"]),
        }
        for name, v in items.items():
            row[f"recall@{k}_{name}"] = ranking_metrics(v.numpy(), targets, k)[f"recall@{k}"]
        out["by_beam"][str(beam)] = row
        log.info("trained checkpoint, beam %d: %s", beam, row)
    for key in next(iter(out["by_beam"].values()), {}):
        if key.startswith("overlap"):
            out[f"{key}_min"] = min(row[key] for row in out["by_beam"].values())
    return out


def overlap(a, b) -> float:
    """Mean top-k overlap of two [users, k] item tensors (onerec.evaluate.topk_overlap)."""
    from onerec.evaluate import topk_overlap

    return topk_overlap(a.cpu().numpy(), b.cpu().numpy(), a.shape[1])


def run_benchmark(
    presets, batches, variants, context_len=3000, beam_size=512, k=10, num_items=1_000_000,
    warmup=3, repeats=20, seed=0, time_budget_s=480.0, check_kernels_first=True, torchao_presets=None,
    torchao_batches=None,
) -> dict:
    import torch

    t0 = time.time()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    result: dict = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": props.name, "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "settings": dict(context_len=context_len, beam_size=beam_size, k=k, num_items=num_items,
                         warmup=warmup, repeats=repeats, seed=seed, batches=batches, variants=variants),
        "runs": [], "skipped": [],
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    try:
        import torchao

        result["torchao"] = torchao.__version__
    except ImportError:
        result["torchao"] = None
    if check_kernels_first:
        result["kernel_checks"] = check_kernels(device)
        log.info("kernel checks passed: %s", result["kernel_checks"]["passed"])
    result["peaks"] = matmul_peaks(device)
    log.info("matmul peaks: %s", result["peaks"])

    # torchao last: its compilation takes minutes, and a time-budget cut then loses only its rows
    passes = [(preset, [v for v in variants if v != "torchao-fp8"], batches) for preset in presets]
    if "torchao-fp8" in variants:
        passes += [(preset, ["torchao-fp8"], torchao_batches or batches) for preset in presets
                   if torchao_presets is None or preset in torchao_presets]
    for preset, preset_variants, preset_batches in passes:
        _bench_preset(result, preset, preset_batches, preset_variants, context_len, beam_size, k, num_items,
                      warmup, repeats, seed, t0, time_budget_s, device)
        torch.cuda.empty_cache()
    result["elapsed_s"] = time.time() - t0
    result["summary"] = summarize(result)
    return result


def _bench_preset(result, preset, batches, variants, context_len, beam_size, k, num_items,
                  warmup, repeats, seed, t0, time_budget_s, device) -> None:
    import torch

    from onerec.engine.engine import Engine, EngineConfig
    from onerec.generate import beam_search

    peaks = result["peaks"]
    model = build_model(preset, context_len, device, torch.bfloat16, seed)
    cfg = model.cfg
    table, index = random_index(num_items, cfg.codebook_size, cfg.n_levels, seed)
    index = index.to(device)
    engines = {
        name: Engine(model, index, EngineConfig(beam_size=beam_size, k=k, fp8=name == "fp8-engine"))
        for name in ("bf16-engine", "fp8-engine") if name in variants or name == "bf16-engine"
    }
    beams = engines["bf16-engine"].beams
    flops_cached = flop_count(cfg, context_len, beams, cached=True)
    ao = None
    choices = result.setdefault("plain_sdpa_choice", {})
    if preset not in choices:  # the torchao pass reuses the first pass's choice
        choices[preset] = choose_plain_sdpa(model, index, cfg, context_len, table, beam_size, k, seed, device,
                                            batch=max([b for b in batches if b <= 8] or [min(batches)]))
    plain_backends = choices[preset]["chosen"]
    for batch in batches:
        sids, mask = random_requests(cfg, batch, context_len, table, seed + batch, device)
        reference_items = None
        if "bf16-eager" not in variants:  # same weights and inputs as the first pass: its eager top-k
            reference_items = _with_sdpa(plain_backends, beam_search, model, sids, mask, index,
                                         beam_size=beam_size, k=k).items
        for variant in variants:
            if time.time() - t0 > time_budget_s:
                result["skipped"].append({"preset": preset, "batch": batch, "variant": variant, "why": "time budget"})
                continue
            log.info("%s batch %d: %s", preset, batch, variant)
            try:
                if variant in engines:
                    fn = functools.partial(engines[variant].recommend, sids, mask)
                else:
                    if variant == "torchao-fp8" and ao is None:
                        ao = torchao_model(model)
                    plain = model if variant == "bf16-eager" else ao
                    fn = functools.partial(_with_sdpa, plain_backends, beam_search, plain, sids, mask, index,
                                           beam_size=beam_size, k=k)
                torch.cuda.synchronize()
                t_first = time.time()
                out = fn()  # first call: compiles / captures; not timed
                torch.cuda.synchronize()
                first_s = time.time() - t_first
                torch.cuda.reset_peak_memory_stats()
                times = time_calls(fn, warmup, repeats)
                peak_mem = torch.cuda.max_memory_allocated()
            except Exception as exc:  # one variant failing must not lose the others' numbers
                log.exception("%s failed", variant)
                result["skipped"].append({"preset": preset, "batch": batch, "variant": variant,
                                          "why": f"{type(exc).__name__}: {exc}"[:500]})
                continue
            p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
            tflops = flops_cached["total"] * batch / (p50 / 1e3) / 1e12
            run = {
                "preset": preset, "batch": batch, "variant": variant,
                "p50_ms": p50, "p99_ms": p99, "mean_ms": sum(times) / len(times), "times_ms": times,
                "first_call_s": first_s,
                "requests_per_s": batch / (p50 / 1e3), "items_per_s": batch * k / (p50 / 1e3),
                "useful_tflops": tflops,
                "mfu_vs_bf16_peak": tflops / peaks["bf16_tflops"],
                "mfu_vs_fp8_peak": tflops / peaks["fp8_tflops"],
                "executed_tflop_per_request": flops_cached["total"] / 1e12,
                "peak_memory_gib": peak_mem / 2**30,
            }
            if variant == "bf16-eager":
                reference_items = out.items
            elif reference_items is not None:
                run["topk_overlap_vs_bf16_eager"] = overlap(out.items, reference_items)
            result["runs"].append(run)
            log.info("%s b=%d %s: p50 %.2f ms p99 %.2f ms", preset, batch, variant, p50, p99)
    result.setdefault("models", {})[preset] = {
        "config": cfg.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
        "beams_per_step": beams, "flops_per_user_cached": flops_cached,
    }


def summarize(result: dict) -> dict:
    """Ratios against the targets (bench/README.md) for each preset."""
    out = {}
    runs = result["runs"]
    for preset in {r["preset"] for r in runs}:
        by = {(r["variant"], r["batch"]): r for r in runs if r["preset"] == preset}

        s = {}
        for v in VARIANTS:
            vals = [r["requests_per_s"] for (variant, _), r in by.items() if variant == v]
            s[f"{v}_best_requests_per_s"] = max(vals) if vals else None
        if ("fp8-engine", 1) in by and ("bf16-eager", 1) in by:
            s["fp8_engine_vs_bf16_eager_p50_at_1"] = by[("fp8-engine", 1)]["p50_ms"] / by[("bf16-eager", 1)]["p50_ms"]
        for other in ("bf16-eager", "bf16-engine", "torchao-fp8"):
            if s.get("fp8-engine_best_requests_per_s") and s.get(f"{other}_best_requests_per_s"):
                s[f"fp8_engine_vs_{other}_throughput"] = s["fp8-engine_best_requests_per_s"] / s[f"{other}_best_requests_per_s"]
        out[preset] = s
    return out


def markdown_table(result: dict) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, CUDA {result['cuda']}, triton {result.get('triton')}, "
        f"peaks bf16 {result['peaks']['bf16_tflops']:.0f} / fp8 {result['peaks']['fp8_tflops']:.0f} TFLOP/s",
        "",
        "| preset | users/batch | variant | p50 ms | p99 ms | req/s | items/s | useful TFLOP/s | MFU bf16 / fp8 peak | peak GiB | top-10 overlap vs bf16 eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    presets = list(dict.fromkeys(r["preset"] for r in result["runs"]))
    runs = sorted(result["runs"], key=lambda r: (presets.index(r["preset"]), r["batch"], VARIANTS.index(r["variant"])))
    for r in runs:
        ov, mem = r.get("topk_overlap_vs_bf16_eager"), r.get("peak_memory_gib")
        lines.append(
            f"| {r['preset']} | {r['batch']} | {r['variant']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['requests_per_s']:.1f} | {r['items_per_s']:.0f} | {r['useful_tflops']:.0f} | "
            f"{r['mfu_vs_bf16_peak']:.0%} / {r['mfu_vs_fp8_peak']:.0%} | "
            f"{'' if mem is None else f'{mem:.1f}'} | "
            f"{'' if ov is None else f'{ov:.2f}'} |"
        )
    for preset, s in sorted(result.get("summary", {}).items()):
        parts = [f"{k} {v:.2f}" for k, v in s.items() if v is not None and "vs" in k]
        if parts:
            lines.append(f"\n{preset}: " + ", ".join(parts))
    trained = result.get("trained_checkpoint")
    if trained:
        lines.append(f"\ntrained checkpoint ({trained['model']}; {trained['users']} validation users, "
                     f"{trained['recipe']}): top-{trained['k']} overlap")
        for beam, row in trained["by_beam"].items():
            lines.append(f"  beam {beam}: " + ", ".join(f"{key} {v:.3f}" for key, v in row.items()))
    for s in result.get("skipped", []):
        lines.append(f"\nskipped {s['preset']} b={s['batch']} {s['variant']}: {s['why'][:200]}")
    return "\n".join(lines)


def write_results(result: dict, out: Path, tag: str = "") -> list[Path]:
    """JSON + markdown table + latency/throughput plot; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_" + result["device"].replace(" ", "_").lower() + (f"_{tag}" if tag else "")
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    paths[1].write_text(markdown_table(result) + "\n")
    try:
        plot(result, paths[2])
    except Exception:  # a plot must never lose the numbers
        log.exception("plot failed")
        paths.pop()
    return paths


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted({r["preset"] for r in result["runs"]})
    fig, axes = plt.subplots(len(presets), 2, figsize=(11, 3.6 * len(presets)), squeeze=False)
    for row, preset in zip(axes, presets, strict=True):
        for variant in VARIANTS:
            rs = sorted((r for r in result["runs"] if r["preset"] == preset and r["variant"] == variant),
                        key=lambda r: r["batch"])
            if not rs:
                continue
            b = [r["batch"] for r in rs]
            row[0].plot(b, [r["p50_ms"] for r in rs], marker="o", label=variant)
            row[1].plot(b, [r["requests_per_s"] for r in rs], marker="o", label=variant)
        for ax, title in zip(row, ("p50 latency (ms)", "requests/s"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("users per batch")
            ax.set_title(f"{preset}: {title}")
            ax.grid(alpha=0.3)
        row[0].legend()
    fig.suptitle(f"{result['device']}: context {result['settings']['context_len']}, beam {result['settings']['beam_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
