"""The GPU benchmark: bf16 eager vs the bf16 engine vs the FP8 engine vs torchao float8, one GPU.

    PYTHONPATH=. python3 bench/gpu_bench.py --out bench/results [--presets 1b --batches 1,8,16 ...]
    [--trained DIR] [--diagnose] [--gate-smoke] [--time-split B]

The Triton kernels are checked first by `pytest -m gpu tests/gpu` (the same session, one
script: see bench/README.md).

Same GPU, same process, same random weights and inputs for every variant:
1. bf16-eager: plain `OneRecV2` + `onerec.generate.beam_search` (the baseline a team starts from:
   SDPA cross-attention on the shared context, a self-attention KV cache reordered by parent beam);
2. bf16-engine: `onerec.engine.Engine` without FP8 (KV cache, fused kernels, CUDA graphs);
3. fp8-engine: the same engine with FP8 GEMMs and fused activation quantization (`--fp8-layers
   timed`: only in the layers whose FP8 GEMM is faster on this GPU at one user, the recipe option
   layer_choice="timed"; the others bf16);
4. torchao-fp8: torchao `Float8DynamicActivationFloat8WeightConfig(PerRow)` on the plain
   model's decoder Linear layers + `torch.compile` of each block's decoding step, run by the plain
   beam search (bench/torchao_baseline.py).

Reports p50/p99 latency per batch, requests/s, items/s (top-k items returned per second),
useful TFLOP/s and MFU against bf16 and FP8 matmul peaks measured in the same run, peak memory,
and the top-k overlap of each variant with bf16 eager. FLOPs are those of the KV-cached search,
which every variant runs. With `--trained DIR` it also measures (bench/gpu_trained_overlap.py) the top-k overlap of the FP8 and
bf16 engines (and the plain search) on a trained checkpoint's real validation histories.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.models import build_model, overlap, random_index, random_requests  # noqa: E402
from bench.report import VARIANTS, markdown_table, write_results  # noqa: E402
from onerec.engine.timing import flop_count, matmul_peaks, percentile, time_calls  # noqa: E402
from onerec.errors import UserError  # noqa: E402

log = logging.getLogger(__name__)


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
    parser.add_argument("--out", default="bench/results", help="folder for the JSON, table and plot")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--trained", default="",
                        help="folder with a trained checkpoint (ckpt/), its quantized folder (quantized/) and "
                             "data folder (data/): FP8 vs bf16 top-k overlap on its validation users")
    parser.add_argument("--trained-beams", default="64,512", help="beam sizes of the trained-checkpoint overlap")
    parser.add_argument("--sdpa-backends", default="",
                        help="SDPA backends in priority order for every variant, e.g. flash,efficient,cudnn,math "
                             "(default: torch's own choice)")
    parser.add_argument("--diagnose", action="store_true", help="attention backends, engine profile, torchao logits")
    parser.add_argument("--gate-smoke", action="store_true", help="run the latency gate on a random 0.1b checkpoint")
    parser.add_argument("--time-split", type=int, default=0, help="batch for the engine's GPU time split (1b)")
    parser.add_argument("--moe-kernel", default=None, choices=["torch", "triton"],
                        help="both engines: the fused MoE op (EngineConfig.moe_kernel); default the MoE module")
    parser.add_argument("--fp8-layers", default="all", choices=["all", "timed"],
                        help="fp8-engine: every Linear in FP8, or only where FP8 timed faster on this GPU at one "
                             "user (fp8_dynamic layer_choice=timed, --beam-size rows; dense presets)")


def main(args: argparse.Namespace) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise UserError("bench/gpu_bench.py needs a CUDA GPU (none is visible here)")
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
            time_budget_s=args.time_budget_s,
            torchao_presets=[p for p in args.torchao_presets.split(",") if p],
            torchao_batches=[int(b) for b in args.torchao_batches.split(",") if b] or None,
            moe_kernel=args.moe_kernel, fp8_layers=args.fp8_layers,
        )
        if args.trained:
            from bench.gpu_trained_overlap import trained_overlap

            try:
                result["trained_checkpoint"] = trained_overlap(
                    Path(args.trained), [int(b) for b in args.trained_beams.split(",") if b], k=args.k)
                result["summary"]["trained_checkpoint"] = {
                    key: v for key, v in result["trained_checkpoint"].items() if key.startswith("overlap")}
            except Exception as exc:  # must not lose the benchmark's numbers
                log.exception("trained-checkpoint overlap failed")
                result["trained_checkpoint_error"] = f"{type(exc).__name__}: {exc}"[:500]
    result["settings"]["sdpa_backends"] = backends or "torch default"
    result["command"] = " ".join(["python3", *sys.argv])
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


def run_benchmark(
    presets, batches, variants, context_len=3000, beam_size=512, k=10, num_items=1_000_000,
    warmup=3, repeats=20, seed=0, time_budget_s=480.0, torchao_presets=None,
    torchao_batches=None, moe_kernel=None, fp8_layers="all",
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
                         warmup=warmup, repeats=repeats, seed=seed, batches=batches, variants=variants,
                         moe_kernel=moe_kernel, fp8_layers=fp8_layers),
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
    result["peaks"] = matmul_peaks(device)
    log.info("matmul peaks: %s", result["peaks"])

    # torchao last: its compilation takes minutes, and a time-budget cut then loses only its rows
    passes = [(preset, [v for v in variants if v != "torchao-fp8"], batches) for preset in presets]
    if "torchao-fp8" in variants:
        passes += [(preset, ["torchao-fp8"], torchao_batches or batches) for preset in presets
                   if torchao_presets is None or preset in torchao_presets]
    for preset, preset_variants, preset_batches in passes:
        _bench_preset(result, preset, preset_batches, preset_variants, context_len, beam_size, k, num_items,
                      warmup, repeats, seed, t0, time_budget_s, device, moe_kernel, fp8_layers)
        torch.cuda.empty_cache()
    result["elapsed_s"] = time.time() - t0
    result["summary"] = summarize(result)
    return result


def _bench_preset(result, preset, batches, variants, context_len, beam_size, k, num_items,
                  warmup, repeats, seed, t0, time_budget_s, device, moe_kernel=None, fp8_layers="all") -> None:
    import torch

    from onerec.engine.engine import Engine, EngineConfig
    from onerec.generate import beam_search

    peaks = result["peaks"]
    model = build_model(preset, context_len, device, torch.bfloat16, seed)
    cfg = model.cfg
    table, index = random_index(num_items, cfg.codebook_size, cfg.n_levels, seed)
    index = index.to(device)
    engines = {
        name: Engine(model, index, EngineConfig(
            beam_size=beam_size, k=k, fp8=name == "fp8-engine", moe_kernel=moe_kernel))
        for name in ("bf16-engine", "fp8-engine") if name in variants or name == "bf16-engine"
    }
    if fp8_layers == "timed" and "fp8-engine" in engines:
        engines["fp8-engine"] = timed_fp8_engine(result, preset, model, index, beam_size, k, moe_kernel)
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
                        from bench.torchao_baseline import torchao_model

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


def timed_fp8_engine(result, preset, model, index, beam_size, k, moe_kernel):
    """The FP8 engine on a copy of `model` quantized as the recipe does with layer_choice="timed"
    (each GEMM timed on this GPU at `beam_size` rows); the choice goes into result["layer_choice"]."""
    from onerec.engine.convert import shared_weights_copy
    from onerec.engine.engine import Engine, EngineConfig
    from onerec.model import MoE
    from onerec.quant.recipes import make_recipe, quantize

    if any(isinstance(m, MoE) for m in model.modules()):
        raise UserError("--fp8-layers timed: dense presets only (FP8 MoE experts come from the engine's fp8=True)")
    timed = shared_weights_copy(model)
    report = quantize(timed, make_recipe("fp8_dynamic", layer_choice="timed", layer_choice_rows=beam_size), measure=False)
    choice = report.layer_choice
    result.setdefault("layer_choice", {})[preset] = {
        **{key: v for key, v in choice.items() if key != "layers"},
        "bf16_layers": sorted(n for n, e in choice["layers"].items() if e["choice"] == "bf16"),
        "gemms": {re.sub(r"blocks\.\d+\.", "", e["gemm"]):  # the same shape in every block: timed once
                  {x: e[x] for x in ("shape", "rows", "fused_input", "bf16_ms", "fp8_ms", "speedup", "choice")}
                  for e in choice["layers"].values()},
    }
    log.info("timed layer choice for %s: %s", preset, result["layer_choice"][preset]["gemms"])
    return Engine(timed, index, EngineConfig(beam_size=beam_size, k=k, moe_kernel=moe_kernel))


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


def run_diagnostics(args: argparse.Namespace) -> None:
    """The optional diagnostics (bench/diagnose.py); a failure here must not cost the benchmark's numbers."""
    from bench import diagnose
    from bench.torchao_baseline import check_torchao

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = {
        "diagnose.json": args.diagnose and (lambda: {
            "attention": diagnose.diagnose_attention(), "torchao_logits": check_torchao(),
            **{f"profile_engine_b{b}_fp8={int(fp8)}": diagnose.profile_engine(b, fp8) for b, fp8 in ((1, False), (8, False), (8, True))},
        }),
        "gate_smoke.json": args.gate_smoke and (lambda: diagnose.gate_smoke(out)),
        "engine_time_split.json": args.time_split and (
            lambda: diagnose.engine_time_split(args.time_split, args.context_len, args.beam_size)),
    }
    for name, job in jobs.items():
        if not job:
            continue
        try:
            (out / name).write_text(json.dumps(job(), indent=1, default=str) + "\n")
            log.info("wrote %s", out / name)
        except Exception:
            log.exception("%s failed", name)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    try:
        summary = main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    run_diagnostics(args)
    print(json.dumps(summary, indent=1, default=str))
