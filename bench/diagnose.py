"""GPU diagnostics run beside the benchmark (bench/gpu_bench.py --diagnose/--gate-smoke/--time-split):
cross-attention shapes under each SDPA backend and split-KV attention, the engine's GPU time by
kind of kernel, a profile of one engine request, the latency gate end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.models import build_model, random_index, random_requests
from onerec.engine.timing import percentile, time_calls


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the keys split into `splits` chunks run as one batch (CUDA).

    One user's cross-attention has only heads x beams/128 query tiles (56 for the 1b model at
    beam 512) for 132 SMs; splitting the 3000 keys multiplies the tiles, and the partial
    results are merged exactly through their log-sum-exps (flash-decoding).
    q [B, H, N, dh], k/v [B, H, T, dh] -> [B, H, N, dh].
    """
    B, H, N, dh = q.shape
    T = k.shape[2]
    L = T // splits
    main = L * splits

    def chunked(t):  # [B, H, main, dh] -> [B * splits, H, L, dh]
        return t[:, :, :main].reshape(B, H, splits, L, dh).transpose(1, 2).reshape(B * splits, H, L, dh)

    qq = q[:, None].expand(B, splits, H, N, dh).reshape(B * splits, H, N, dh)
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    out, lse = flash(qq, chunked(k), chunked(v), 0.0, False, False)[:2]
    outs = [out.view(B, splits, H, N, dh)]
    lses = [lse.view(B, splits, H, N)]
    if main < T:
        out_r, lse_r = flash(q, k[:, :, main:], v[:, :, main:], 0.0, False, False)[:2]
        outs.append(out_r[:, None])
        lses.append(lse_r[:, None])
    out, lse = torch.cat(outs, 1), torch.cat(lses, 1)
    weight = torch.softmax(lse, dim=1)  # exp(lse_i - logsumexp_i lse_i)
    return (out.float() * weight[..., None]).sum(1).to(q.dtype)


def diagnose_attention() -> dict:
    """Cross-attention shapes of the engine and the plain search under each SDPA backend."""
    import functools

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

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
                            ms = percentile(time_calls(fn, 3, 10), 0.5)
                        out[key] = {"ms": ms, "tflops": flops / ms / 1e9}
                    except Exception as exc:
                        out[key] = {"error": str(exc)[:120]}
        for splits in (2, 4, 8):
            ref = F.scaled_dot_product_attention(q, kv, kv)
            got = split_kv_attention(q, kv, kv, splits)
            fn = functools.partial(split_kv_attention, q, kv, kv, splits)
            ms = percentile(time_calls(fn, 3, 10), 0.5)
            out[f"{name}/split{splits}"] = {"ms": ms, "tflops": flops / ms / 1e9,
                                            "rel_err": float((got - ref).float().norm() / ref.float().norm())}
    return out


def engine_time_split(batch: int, context_len=3000, beam_size=512) -> dict:
    """GPU time of one engine request by kind of kernel (GEMM, SDPA cross-attention, the rest), bf16
    and FP8: where the FP8-vs-bf16 ratio can and cannot come from (bench/NOTES.md)."""
    from onerec.engine.engine import Engine, EngineConfig

    model = build_model("1b", context_len, torch.device("cuda"), torch.bfloat16, 0)
    table, index = random_index(1_000_000, model.cfg.codebook_size, 3, 0)
    sids, mask = random_requests(model.cfg, batch, context_len, table, 1, "cuda")
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
    from onerec.engine.engine import Engine, EngineConfig

    model = build_model("1b", context_len, torch.device("cuda"), torch.bfloat16, 0)
    table, index = random_index(1_000_000, model.cfg.codebook_size, 3, 0)
    eng = Engine(model, index.to("cuda"), EngineConfig(beam_size=beam_size, fp8=fp8, cuda_graphs=False))
    sids, mask = random_requests(model.cfg, batch, context_len, table, 1, "cuda")
    eng.recommend(sids, mask)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eng.recommend(sids, mask)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)


def gate_smoke(out_dir: Path, preset: str = "0.1b") -> dict:
    """The latency gate end to end on a random `preset` checkpoint and its fp8_dynamic quantization."""
    import tempfile

    from onerec.checkpoint import save_checkpoint
    from onerec.engine.latency_gate import LatencyGateConfig, measure_latency
    from onerec.quant.export import save_quantized
    from onerec.quant.recipes import quantize

    root = Path(tempfile.mkdtemp())
    model = build_model(preset, 3000, torch.device("cuda"), torch.float32, 0)
    table, _ = random_index(200_000, model.cfg.codebook_size, 3, 0)
    save_checkpoint(model.cpu(), table, root / "ckpt")
    report = quantize(model, "fp8_dynamic", measure=False)
    save_quantized(model, table, report, root / "q", source_checkpoint=root / "ckpt")
    result = measure_latency(root / "ckpt", root / "q", LatencyGateConfig(batch_sizes=(1, 8), repeats=10))
    (out_dir / "gate_smoke.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result
