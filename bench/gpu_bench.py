"""GPU entry of the benchmark: Triton kernel checks, then `onerec-fp8 bench`, in one process.

    PYTHONPATH=. python3 bench/gpu_bench.py --out bench/results [bench options]

Same options as `onerec-fp8 bench` (onerec/engine/benchmark.py), plus --diagnose-plain B1,B2: the
plain search's self-attention written out vs SDPA backends, and without its KV cache (baseline checks).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onerec.engine import benchmark  # noqa: E402


def diagnose_plain(batches, context_len=3000, beam_size=512, preset="1b") -> dict:
    """The plain search's 1-query self-attention: the model's SDPA call (default backend) vs forced
    SDPA backends and written-out versions, and the search without its KV cache, for the record."""
    import functools

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from onerec.generate import beam_search
    from onerec.model import LazyDecoderBlock

    model = benchmark.build_model(preset, context_len, torch.device("cuda"), torch.bfloat16, 0)
    table, index = benchmark.random_index(1_000_000, model.cfg.codebook_size, 3, 0)
    index = index.to("cuda")
    original = LazyDecoderBlock.cached_self_attention

    def variant(attend):
        def cached_self_attention(self, x, cache):
            cfg = self.cfg
            S, _ = x.shape
            qkv = self.self_qkv(self.self_norm(x)).view(S, 3, cfg.n_heads, 1, cfg.d_head)
            kv = qkv[:, 1:] if cache is None else torch.cat([cache, qkv[:, 1:]], dim=3)
            out = attend(qkv[:, 0], kv[:, 0], kv[:, 1], cfg.d_head**-0.5)
            return self.self_o(out.reshape(S, -1)), kv
        return cached_self_attention

    def forced(backend):
        def attend(q, k, v, scale):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return attend

    def matmul(q, k, v, scale):
        return torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).to(v.dtype) @ v

    def elementwise(q, k, v, scale):
        w = torch.softmax((q * k).sum(-1, dtype=torch.float32) * scale, dim=-1)  # [S, H, t]
        return (w.to(v.dtype)[..., None] * v).sum(-2, keepdim=True)

    variants = {"model_sdpa_default": original, "sdpa_flash": variant(forced(SDPBackend.FLASH_ATTENTION)),
                "sdpa_efficient": variant(forced(SDPBackend.EFFICIENT_ATTENTION)),
                "sdpa_math": variant(forced(SDPBackend.MATH)), "sdpa_cudnn": variant(forced(SDPBackend.CUDNN_ATTENTION)),
                "written_out_matmul": variant(matmul), "written_out_elementwise": variant(elementwise)}
    out = {}
    for b in batches:
        sids, mask = benchmark.random_requests(model.cfg, b, context_len, table, b, "cuda")
        for name, impl in variants.items():
            LazyDecoderBlock.cached_self_attention = impl
            try:
                fn = functools.partial(beam_search, model, sids, mask, index, beam_size=beam_size, k=10)
                out[f"{name}_b{b}_ms"] = benchmark.percentile(benchmark.time_calls(fn, 2, 8), 0.5)
            except Exception as exc:
                out[f"{name}_b{b}_ms"] = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                LazyDecoderBlock.cached_self_attention = original
        fn = functools.partial(beam_search, model, sids, mask, index, beam_size=beam_size, k=10, use_cache=False)
        out[f"no_cache_b{b}_ms"] = benchmark.percentile(benchmark.time_calls(fn, 1, 5), 0.5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        sids, mask = benchmark.random_requests(model.cfg, 8, context_len, table, 8, "cuda")
        beam_search(model, sids, mask, index, beam_size=beam_size, k=10)
        torch.cuda.synchronize()
    events = prof.key_averages()
    out["profile_b8"] = events.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
    out["profile_b8_kernels"] = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    del model
    torch.cuda.empty_cache()
    return out


def diagnose_attention() -> dict:
    """Cross-attention shapes of the engine and the plain search under each SDPA backend."""
    import functools

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from onerec.engine.engine import split_kv_attention

    H, dh, T = 14, 128, 3001
    out = {}
    for name, (B, N) in {"engine_b1": (1, 512), "engine_b8": (8, 512), "plain_b8": (8, 1536)}.items():
        q = torch.randn(B, N, H, dh, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        kv = torch.randn(B, T, H, dh, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        mask = torch.ones(B, 1, 1, T, dtype=torch.bool, device="cuda")
        flops = 4 * B * H * N * T * dh
        for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            for masked in (False, True):
                for contiguous in (False, True):
                    qq = q.contiguous() if contiguous else q
                    kk = kv.contiguous() if contiguous else kv
                    key = f"{name}/{backend}/mask={int(masked)}/contig={int(contiguous)}"
                    try:
                        with sdpa_kernel(getattr(SDPBackend, backend)):
                            fn = functools.partial(F.scaled_dot_product_attention, qq, kk, kk,
                                                   attn_mask=mask if masked else None)
                            ms = benchmark.percentile(benchmark.time_calls(fn, 3, 10), 0.5)
                        out[key] = {"ms": ms, "tflops": flops / ms / 1e9}
                    except Exception as exc:
                        out[key] = {"error": str(exc)[:120]}
        for splits in (2, 4, 8):
            ref = F.scaled_dot_product_attention(q, kv, kv)
            got = split_kv_attention(q, kv, kv, splits)
            fn = functools.partial(split_kv_attention, q, kv, kv, splits)
            ms = benchmark.percentile(benchmark.time_calls(fn, 3, 10), 0.5)
            out[f"{name}/split{splits}"] = {"ms": ms, "tflops": flops / ms / 1e9,
                                            "rel_err": float((got - ref).float().norm() / ref.float().norm())}
    return out


def engine_time_split(batch: int, context_len=3000, beam_size=512) -> dict:
    """GPU time of one engine request by kind of kernel (GEMM, SDPA cross-attention, the rest), bf16
    and FP8: where the FP8-vs-bf16 ratio can and cannot come from (bench/NOTES.md)."""
    import torch

    from onerec.engine.engine import Engine, EngineConfig

    model = benchmark.build_model("1b", context_len, torch.device("cuda"), torch.bfloat16, 0)
    table, index = benchmark.random_index(1_000_000, model.cfg.codebook_size, 3, 0)
    sids, mask = benchmark.random_requests(model.cfg, batch, context_len, table, 1, "cuda")
    out = {}
    for fp8 in (False, True):
        eng = Engine(model, index.to("cuda"), EngineConfig(beam_size=beam_size, fp8=fp8, cuda_graphs=False))
        eng.recommend(sids, mask)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng.recommend(sids, mask)
            torch.cuda.synchronize()
        split = {"gemm_ms": 0.0, "cross_attention_ms": 0.0, "other_ms": 0.0}
        top = []
        for evt in prof.key_averages():
            us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            if not us:
                continue
            name = evt.key.lower()
            kind = ("gemm_ms" if any(t in name for t in ("nvjet", "gemm", "cutlass", "xmma", "scaled_mm"))
                    else "cross_attention_ms" if any(t in name for t in ("sdpa", "fmha", "flash", "attention_kernel"))
                    and "self_attention" not in name else "other_ms")
            split[kind] += us / 1e3
            top.append((us / 1e3, evt.key[:80], kind))
        split["total_ms"] = sum(v for k, v in split.items() if k.endswith("_ms"))
        split["top_kernels"] = [{"ms": ms, "name": n, "kind": k} for ms, n, k in sorted(top, reverse=True)[:12]]
        out["fp8" if fp8 else "bf16"] = split
        del eng
    del model
    torch.cuda.empty_cache()
    return out


def profile_engine(batch: int, fp8: bool, context_len=3000, beam_size=512) -> str:
    import torch

    from onerec.engine.engine import Engine, EngineConfig

    model = benchmark.build_model("1b", context_len, torch.device("cuda"), torch.bfloat16, 0)
    table, index = benchmark.random_index(1_000_000, model.cfg.codebook_size, 3, 0)
    eng = Engine(model, index.to("cuda"), EngineConfig(beam_size=beam_size, fp8=fp8, cuda_graphs=False))
    sids, mask = benchmark.random_requests(model.cfg, batch, context_len, table, 1, "cuda")
    eng.recommend(sids, mask)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eng.recommend(sids, mask)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)


def check_torchao(batch=2, context_len=3000) -> dict:
    """Teacher-forced logits: torchao float8 and the quant module's FP8Linear vs bf16 (eager)."""
    import copy

    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from onerec.quant.fp8 import FP8Linear

    model = benchmark.build_model("1b", context_len, torch.device("cuda"), torch.bfloat16, 0)
    table, _ = benchmark.random_index(100_000, model.cfg.codebook_size, 3, 0)
    sids, mask = benchmark.random_requests(model.cfg, batch, context_len, table, 1, "cuda")
    target = sids[:, -1]
    with torch.no_grad():
        ref = model(sids, mask, target).float()
        ao = copy.deepcopy(model)
        quantize_(ao, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.startswith("heads"))
        got_ao = ao(sids, mask, target).float()
        ours = copy.deepcopy(model)
        for name, mod in list(ours.named_modules()):
            for child_name, child in list(mod.named_children()):
                fqn = f"{name}.{child_name}" if name else child_name
                if isinstance(child, torch.nn.Linear) and not fqn.startswith("heads"):
                    setattr(mod, child_name, FP8Linear.from_linear(child))
        got_ours = ours(sids, mask, target).float()
    rel = lambda a: float((a - ref).norm() / ref.norm())
    return {"torchao_rel_err": rel(got_ao), "fp8linear_rel_err": rel(got_ours),
            "torchao_vs_fp8linear": float((got_ao - got_ours).norm() / got_ours.norm()),
            "ref_logit_std": float(ref.std())}


def gate_smoke(out_dir: Path, preset: str = "0.1b") -> dict:
    """The latency gate end to end on a random `preset` checkpoint and its fp8_dynamic quantization."""
    import tempfile

    import torch

    from onerec.checkpoint import save_checkpoint
    from onerec.engine.latency_gate import LatencyGateConfig, measure_latency
    from onerec.quant.export import save_quantized
    from onerec.quant.recipes import quantize

    root = Path(tempfile.mkdtemp())
    model = benchmark.build_model(preset, 3000, torch.device("cuda"), torch.float32, 0)
    table, _ = benchmark.random_index(200_000, model.cfg.codebook_size, 3, 0)
    save_checkpoint(model.cpu(), table, root / "ckpt")
    report = quantize(model, "fp8_dynamic", measure=False)
    save_quantized(model, table, report, root / "q", source_checkpoint=root / "ckpt")
    result = measure_latency(root / "ckpt", root / "q", LatencyGateConfig(batch_sizes=(1, 8), repeats=10))
    (out_dir / "gate_smoke.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(parser)
    parser.add_argument("--diagnose-plain", default="", help="batches for the plain-baseline diagnosis")
    parser.add_argument("--diagnose", action="store_true", help="attention backends, engine profile, torchao logits")
    parser.add_argument("--gate-smoke", action="store_true", help="run the latency gate on a random 0.1b checkpoint")
    parser.add_argument("--time-split", type=int, default=0, help="batch for the engine's GPU time split (1b)")
    args = parser.parse_args()
    if args.diagnose:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        diag = {"attention": diagnose_attention(), "torchao_logits": check_torchao()}
        for b, fp8 in ((1, False), (8, False), (8, True)):
            table = profile_engine(b, fp8)
            diag[f"profile_engine_b{b}_fp8={int(fp8)}"] = table
            print(table, file=sys.stderr)
        (Path(args.out) / "diagnose.json").write_text(json.dumps(diag, indent=1) + "\n")
        for k, v in diag["attention"].items():
            print(k, v, file=sys.stderr)
        print(diag["torchao_logits"], file=sys.stderr)
    parser_gate = args.gate_smoke
    summary = benchmark.main(args)
    if args.diagnose_plain:  # after the benchmark: a failure here must not cost its numbers
        try:
            diag = diagnose_plain([int(b) for b in args.diagnose_plain.split(",")], args.context_len, args.beam_size)
            (Path(args.out) / "diagnose_plain.json").write_text(json.dumps(diag, indent=1) + "\n")
            print(diag["profile_b8"], file=sys.stderr)
            print(json.dumps({k: v for k, v in diag.items() if k != "profile_b8"}), file=sys.stderr)
        except Exception:
            logging.exception("plain diagnosis failed")
    if parser_gate:
        try:
            gate = gate_smoke(Path(args.out))
            print(json.dumps({k: v for k, v in gate.items() if k != "thresholds"}, default=str), file=sys.stderr)
        except Exception:
            logging.exception("gate smoke failed")
    if args.time_split:
        try:
            split = engine_time_split(args.time_split, args.context_len, args.beam_size)
            (Path(args.out) / "engine_time_split.json").write_text(json.dumps(split, indent=1) + "\n")
            for name, row in split.items():
                print(name, {k: round(v, 2) for k, v in row.items() if k.endswith("_ms")}, file=sys.stderr)
        except Exception:
            logging.exception("time split failed")
    print(json.dumps(summary, indent=1, default=str))
