"""Engine (onerec/engine): op references, engine == plain beam search, latency gate on CPU.

The Triton kernels themselves are checked against these references on the GPU by
tests/gpu/test_kernels.py.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onerec.engine.convert import serving_model
from onerec.engine.engine import Engine, EngineConfig
from onerec.engine.layers import (
    FusedMoE,
    ServingCachedSelfAttention,
    ServingContextAttention,
    ServingRMSNorm,
    ServingSwiGLU,
    stack_experts,
)
from onerec.generate import beam_search
from onerec.kernels import Kernel, reference
from onerec.model import CachedSelfAttention, ContextAttention, OneRecV2, OneRecV2Config, RMSNorm, SwiGLU
from onerec.quant.fp8 import FP8Linear, quantize_per_token
from onerec.semantic_ids import SemanticIdIndex


def _fp8_equal(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_reference_equals_unfused_ops(dtype):
    torch.manual_seed(0)
    x = (torch.randn(37, 96) * 3).to(dtype)
    delta = torch.randn(37, 96).to(dtype)
    norm = RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(dtype)
    stream = x + delta  # the residual add of the previous sublayer
    expected_fp8, expected_scale = quantize_per_token(norm(stream))

    new_x, y_fp8, scale = reference.rmsnorm(x, norm.weight, 1e-6, residual=delta, quantize=True)
    assert torch.equal(new_x, stream)
    assert y_fp8.dtype == torch.float8_e4m3fn and scale.shape == (37, 1)
    assert _fp8_equal(y_fp8, expected_fp8)
    assert torch.equal(scale, expected_scale)
    _, y = reference.rmsnorm(x, norm.weight, 1e-6, residual=delta)
    assert torch.equal(y, norm(stream))


def test_silu_mul_reference_equals_unfused_swiglu():
    torch.manual_seed(1)
    cfg = OneRecV2Config.from_preset("tiny")
    ffn = OneRecV2(cfg).blocks[0].ffn.to(torch.bfloat16)
    x = torch.randn(11, cfg.d_model, dtype=torch.bfloat16)
    hidden = F.silu(ffn.w1(x)) * ffn.w3(x)  # what SwiGLU feeds to w2
    gate_up = torch.cat([ffn.w1(x), ffn.w3(x)], dim=-1)  # the engine's fused w1|w3 GEMM output
    assert torch.equal(reference.silu_mul(gate_up), hidden)
    q, s = reference.silu_mul(gate_up, quantize=True)
    q_ref, s_ref = quantize_per_token(hidden)
    assert _fp8_equal(q, q_ref) and torch.equal(s, s_ref)


def test_cached_self_attention_equals_causal_sdpa():
    """Token t's output from the cache (BOS per user, token 1 via parent) == causal SDPA on [BOS, s1, s2]."""
    torch.manual_seed(2)
    users, K1, K2, H, dh = 2, 3, 5, 2, 8
    first = torch.randn(users, 3, H, dh)
    mid = torch.randn(users * K1, 3, H, dh)
    cur = torch.randn(users * K2, 3, H, dh)
    parent = torch.randint(0, K1, (users, K2))
    user = torch.arange(users)[:, None]
    rows = [user.expand(users, K2).reshape(-1), (user * K1 + parent).reshape(-1)]  # ancestors at tokens 0, 1
    got = reference.cached_self_attention(cur, [first, mid], rows)
    for u in range(users):
        for j in range(K2):
            r, p = u * K2 + j, u * K1 + parent[u, j]
            seq = torch.stack([first[u], mid[p], cur[r]])  # [3 tokens, 3 (qkv), H, dh]
            q, k, v = (seq[:, i].transpose(0, 1) for i in range(3))  # [H, 3, dh]
            want = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, -1].reshape(-1)
            torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-6)


def _random_setup(preset="tiny", n_items=600, seed=0):
    torch.manual_seed(seed)
    cfg = OneRecV2Config.from_preset(preset)
    model = OneRecV2(cfg).eval()
    with torch.no_grad():  # larger weights than the init: well-separated scores, no near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        model.bos.normal_(0, 0.3)
        model.context.user_token.normal_(0, 0.3)
    rng = np.random.default_rng(seed)
    table = np.unique(rng.integers(0, cfg.codebook_size, (n_items, 3)), axis=0).astype(np.int32)
    table = rng.permutation(table)
    index = SemanticIdIndex.build(table, cfg.codebook_size)
    B, T = 3, 20
    g = torch.Generator().manual_seed(seed)
    sids = torch.randint(0, cfg.codebook_size, (B, T, 3), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :7] = False  # a left-padded (shorter) history
    return model, index, sids, mask


@pytest.mark.parametrize("beam_size", [16, 64])
def test_engine_bf16_path_equals_plain_beam_search(beam_size):
    model, index, sids, mask = _random_setup()
    want = beam_search(model, sids, mask, index, beam_size=beam_size, k=10)
    engine = Engine(model, index, EngineConfig(beam_size=beam_size, k=10))
    assert not engine.fp8
    got = engine.recommend(sids, mask)
    assert torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-4)


def test_engine_moe_model_equals_plain_beam_search():
    model, index, sids, mask = _random_setup("tiny-moe")
    want = beam_search(model, sids, mask, index, beam_size=16, k=10)
    got = Engine(model, index, EngineConfig(beam_size=16, k=10)).recommend(sids, mask)
    assert torch.equal(got.items, want.items)


def test_engine_fp8_equals_quantized_model_through_beam_search():
    from onerec.quant.recipes import quantize

    model, index, sids, mask = _random_setup(seed=3)
    qmodel = copy.deepcopy(model)
    quantize(qmodel, "fp8_dynamic", measure=False)
    assert any(isinstance(m, FP8Linear) for m in qmodel.modules())
    want = beam_search(qmodel, sids, mask, index, beam_size=32, k=10)
    engine = Engine(qmodel, index, EngineConfig(beam_size=32, k=10))
    assert engine.fp8
    got = engine.recommend(sids, mask)
    assert torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-4)
    # quantizing on the fly (fp8=True on the bf16 model) is the same per-channel recipe
    on_the_fly = Engine(model, index, EngineConfig(beam_size=32, k=10, fp8=True)).recommend(sids, mask)
    assert torch.equal(on_the_fly.items, want.items)


def test_engine_fp8_differs_from_bf16_engine():
    """Guards against an FP8 path that silently runs bf16: the scores must move (a little)."""
    model, index, sids, mask = _random_setup(seed=4)
    bf16 = Engine(model, index, EngineConfig(beam_size=16, k=10)).recommend(sids, mask)
    fp8 = Engine(model, index, EngineConfig(beam_size=16, k=10, fp8=True)).recommend(sids, mask)
    assert not torch.equal(bf16.scores, fp8.scores)


def test_latency_gate_on_cpu_is_not_measurable(tmp_path, capsys):
    from onerec.engine.latency_gate import measure_latency
    from onerec_fp8.cli import main

    result = measure_latency(tmp_path, tmp_path)
    assert result["measurable"] is False and "CUDA" in result["reason"]
    assert result["passed"] is None
    assert not any("ms" in key for key in result)  # never a made-up number
    code = main(["gate", "latency", "--checkpoint", str(tmp_path), "--quantized", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["measurable"] is False


def test_latency_gate_report_dir_has_json_and_png(tmp_path, capsys):
    from onerec.engine.latency_gate import LatencyGateConfig, plot
    from onerec_fp8.cli import main

    report = tmp_path / "report"
    code = main(["gate", "latency", "--checkpoint", str(tmp_path), "--quantized", str(tmp_path),
                 "--report-dir", str(report)])
    capsys.readouterr()
    assert code == 0
    assert json.loads((report / "latency_gate.json").read_text())["measurable"] is False
    assert (report / "latency_gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the measurable case, as the GPU produces it
    measured = {
        "measurable": True, "passed": False, "device": "GPU", "latency_ratio": 1.1, "throughput_ratio": 0.9,
        "thresholds": {"max_latency_ratio": LatencyGateConfig.max_latency_ratio,
                       "min_throughput_ratio": LatencyGateConfig.min_throughput_ratio},
        "latency_ms": {name: {b: {"p50_ms": 3.0 * b, "requests_per_s": 100.0 / b} for b in (1, 8)}
                       for name in ("bf16", "fp8")},
    }
    png = plot(measured, tmp_path / "measured.png")
    assert png.stat().st_size > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_refuses_without_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_bench.py"
    run = subprocess.run([sys.executable, str(script), "--presets", "tiny"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == "error: bench/gpu_bench.py needs a CUDA GPU (none is visible here)"


def test_flop_count_cached_is_less_than_plain():
    from onerec.engine.timing import flop_count

    cfg = OneRecV2Config.from_preset("1b")
    cached = flop_count(cfg, 3000, [512, 512, 512], cached=True)
    plain = flop_count(cfg, 3000, [512, 512, 512], cached=False)
    # 1 + 512 + 512 decoder rows per user instead of 1 + 2 * 512 + 3 * 512
    assert cached["linear"] < plain["linear"] < 2.6 * cached["linear"]
    assert 1.5e12 < cached["total"] < 2.5e12


# ---------------------------------------------------------------------------------------------
# the plain model's incremental decoding (the bf16-eager baseline of the benchmark)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_decode_step_with_reordered_cache_equals_full_prefix(preset):
    """decode_step over a cache selected by parent beam == next_level_logits on the whole prefix."""
    model, _, sids, mask = _random_setup(preset, seed=5)
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ctx = model.encode_context(sids, mask)
        B = sids.shape[0]
        logits, cache = model.decode_step(None, ctx)
        torch.testing.assert_close(logits, model.next_level_logits(torch.zeros(B, 1, 0, dtype=torch.long), ctx))
        prefix = torch.zeros(B, 1, 0, dtype=torch.long)
        for level, beams in ((1, 4), (2, 6)):
            parent = torch.randint(0, prefix.shape[1], (B, beams), generator=g)  # repeats and reorders beams
            codes = torch.randint(0, cfg.codebook_size, (B, beams), generator=g)
            prefix = torch.cat([prefix.gather(1, parent[..., None].expand(-1, -1, level - 1)), codes[..., None]], -1)
            logits, cache = model.decode_step(codes, ctx, cache.select(parent))
            assert cache.length == level + 1 and cache.beams == beams
            want = model.next_level_logits(prefix, ctx)
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("beam_size", [8, 48])
def test_cached_beam_search_equals_uncached(preset, beam_size):
    model, index, sids, mask = _random_setup(preset, seed=6)
    cached = beam_search(model, sids, mask, index, beam_size=beam_size, k=8)
    full = beam_search(model, sids, mask, index, beam_size=beam_size, k=8, use_cache=False)
    assert torch.equal(cached.items, full.items)
    torch.testing.assert_close(cached.scores, full.scores, rtol=1e-5, atol=1e-5)
    # and on the default (small) weights, where scores are close together
    torch.manual_seed(7)
    plain = OneRecV2(model.cfg).eval()
    a = beam_search(plain, sids, mask, index, beam_size=beam_size, k=8)
    b = beam_search(plain, sids, mask, index, beam_size=beam_size, k=8, use_cache=False)
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)


def test_attention_in_chunks_equals_one_call():
    """The batch split that keeps CUDA attention kernels under their grid limit computes the same thing."""
    from onerec.model import attention

    q, k, v = (torch.randn(37, 2, 3, 8) for _ in range(3))
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    chunked = attention(q, k, v, max_batch=5, is_causal=True)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_engine_serves_the_model_without_changing_or_copying_it():
    """The serving view shares every weight with the caller's model and leaves its modules as they were."""
    from torch import nn

    model, index, sids, mask = _random_setup()
    before = beam_search(model, sids, mask, index, beam_size=16, k=10)
    engine = Engine(model, index, EngineConfig(beam_size=16, k=10, fp8=True))
    served = engine.model
    assert served.blocks[0].cross_norm.weight is model.blocks[0].cross_norm.weight
    assert served.token_embedding.weight is model.token_embedding.weight
    assert served.blocks[0].cross_norm.quantize_output and served.blocks[0].ffn.w13 is not None
    assert type(model.blocks[0].cross_q) is nn.Linear and type(model.blocks[0].ffn) is SwiGLU
    assert type(model.blocks[0].cross_norm) is RMSNorm
    engine.recommend(sids, mask)
    after = beam_search(model, sids, mask, index, beam_size=16, k=10)
    assert torch.equal(after.items, before.items) and torch.equal(after.scores, before.scores)


def test_serving_model_swaps_in_the_engines_modules_over_the_models_parameters():
    """Triton kernels (converted on CPU, not run): every norm and attention op is the engine's, the
    dense FFNs one w1|w3 GEMM, and the converted model holds the caller's parameters themselves."""
    model, _, _, _ = _random_setup()
    served = serving_model(model, fp8=False, quantize_context=True, kernel=Kernel.TRITON)
    assert not any(type(m) is RMSNorm for m in served.modules())
    assert sum(type(m) is ServingRMSNorm for m in served.modules()) == sum(type(m) is RMSNorm for m in model.modules())
    for block, original in zip(served.blocks, model.blocks, strict=True):
        assert type(block.cross_attn) is ServingContextAttention and type(block.cached_self_attn) is ServingCachedSelfAttention
        assert type(block.ffn) is ServingSwiGLU and block.ffn.kernel is Kernel.TRITON
        assert block.cross_q.weight.data_ptr() == original.cross_q.weight.data_ptr()  # bf16: the same storage
        assert type(original.cross_attn) is ContextAttention and type(original.cached_self_attn) is CachedSelfAttention
    model_tensors = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert all(id(t) in model_tensors for t in [*served.parameters(), *served.buffers()])
    # the reference kernel: only what computes differently is swapped (FP8 outputs), the rest is the model's
    torch_fp8 = serving_model(model, fp8=True, quantize_context=True, kernel=Kernel.TORCH)
    assert type(torch_fp8.blocks[0].cross_norm) is ServingRMSNorm and torch_fp8.blocks[0].cross_norm.quantize_output
    assert type(torch_fp8.head_norms[0]) is RMSNorm and type(torch_fp8.blocks[0].cross_attn) is ContextAttention


def test_engine_config_parses_kernel_names_once():
    config = EngineConfig(kernel="triton", moe_kernel="torch")
    assert config.kernel is Kernel.TRITON and config.moe_kernel is Kernel.TORCH
    assert EngineConfig(kernel=Kernel.TORCH).kernel is Kernel.TORCH and EngineConfig().kernel is None
    with pytest.raises(ValueError, match="^unknown kernel 'cuda'; known: torch, triton$"):
        EngineConfig(kernel="cuda")


def test_kernels_take_what_they_need_of_the_model_as_arguments():
    """No import loop between the model and its ops: onerec/kernels imports neither the model nor
    the engine, and the model imports nothing of the engine."""
    root = Path(__file__).resolve().parents[2] / "onerec"

    def imports(path):
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    for path in sorted((root / "kernels").glob("*.py")):
        assert not {m for m in imports(path) if m.startswith(("onerec.model", "onerec.engine"))}, path.name
    assert not {m for m in imports(root / "model.py") if m.startswith("onerec.engine")}


def test_moe_kernel_switch_refuses_a_fused_kernel_without_stacked_experts():
    from onerec.quant.recipes import quantize

    model, _, _, _ = _random_setup("tiny-moe")
    quantize(model, "fp8_dynamic")  # per-channel FP8 experts: a layout the grouped GEMM cannot take
    with pytest.raises(ValueError, match="'triton' needs the stacked experts"):
        FusedMoE(stack_experts(model.blocks[1].ffn), Kernel.TRITON)


def test_varlen_cross_attention_layout_reads_exactly_the_real_keys(monkeypatch):
    """The offsets the GPU path hands FlashAttention-2 (`seqused_k` and `cu_seqlens_k` over the
    padded rows) select each user's real keys: with the kernel emulated on CPU as documented, the
    result equals SDPA with the mask, for random left padding, GQA and the cached layout."""
    from onerec.kernels import flash_attention

    def emulated(q, k, v, cu_q, cu_k, max_q, max_k, used_k):
        out = torch.empty_like(q)
        for b in range(len(used_k)):
            qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b]) + int(used_k[b]))
            assert int(cu_q[b + 1]) - int(cu_q[b]) <= max_q and int(used_k[b]) <= max_k
            out[qs] = F.scaled_dot_product_attention(q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1),
                                                     enable_gqa=True).transpose(0, 1)
        return out

    monkeypatch.setattr(flash_attention, "flash_varlen", emulated)
    torch.manual_seed(0)
    B, H, G, N, S, dh = 3, 4, 2, 5, 9, 8
    q = torch.randn(B, N, H, dh).transpose(1, 2)  # the model's layouts: [B, N, H, dh] and [B, S, G, dh] in memory
    k = torch.randn(B, S, G, dh).transpose(1, 2)
    key_start = torch.tensor([0, 4, 8], dtype=torch.int32)  # no padding, some, only the user token
    mask = torch.arange(S)[None, :] >= key_start[:, None]
    want = reference.cross_attention(q, k, k, mask)
    cache = {}
    got = flash_attention.cross_attention(q, k, k, key_start, cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert list(cache) == [("varlen", S, N)]
    torch.testing.assert_close(flash_attention.cross_attention(q, k, k, key_start, cache), want, rtol=1e-5, atol=1e-5)


def test_context_keys_start_where_the_real_positions_start():
    """The model lays each user's real context positions (history, then the user token) as one
    block at the end of its row, and says where it starts: what the varlen kernel relies on."""
    cfg = OneRecV2Config.from_preset("tiny")
    model = OneRecV2(cfg).eval()
    sids = torch.randint(0, cfg.codebook_size, (3, 6, 3))
    mask = torch.tensor([[True] * 6, [False] * 4 + [True] * 2, [False] * 6])
    ctx = model.encode_context(sids, mask)
    assert ctx.key_start.tolist() == [0, 4, 6] and ctx.key_start.dtype == torch.int32
    for b in range(3):
        real = ctx.mask[b].nonzero().flatten().tolist()
        assert real == list(range(int(ctx.key_start[b]), 7))
