"""OneRec-V2 model, beam search and checkpoint I/O: shapes, sharing, routing, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from onerec.checkpoint import load_checkpoint, save_checkpoint
from onerec.errors import UserError
from onerec.generate import beam_search
from onerec.manifest import verify_manifest
from onerec.model import PRESETS, MoE, OneRecV2, OneRecV2Config
from onerec.semantic_ids import SemanticIdIndex

PAPER_PRESETS = ["0.1b", "0.2b", "0.5b", "1b", "2b", "4b", "8b", "moe-4b"]
PAPER_SHAPES = {  # d_model / layers / heads from the OneRec-V2 report
    "0.1b": (640, 12, 10), "0.2b": (896, 12, 14), "0.5b": (1408, 14, 11), "1b": (1792, 18, 14),
    "2b": (2304, 22, 18), "4b": (2944, 26, 23), "8b": (3584, 34, 28), "moe-4b": (1408, 14, 11),
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_block_params(cfg: OneRecV2Config, layer: int) -> int:
    d = cfg.d_model
    attention = 6 * d * d  # cross q, o + self qkv, o (n_heads * d_head == d_model)
    norms = 3 * d
    if cfg.is_moe_layer(layer):
        e, h = cfg.n_routed_experts, cfg.expert_hidden
        ffn = d * e + e * 3 * d * h + 3 * d * h * cfg.n_shared_experts
    else:
        ffn = 3 * d * cfg.ffn_hidden
    return attention + norms + ffn


def expected_context_params(cfg: OneRecV2Config) -> int:
    d, chunk = cfg.d_model, cfg.G_kv * cfg.d_head
    return (
        cfg.n_levels * cfg.codebook_size * d  # item (semantic-id) embeddings
        + cfg.context_len * d  # recency positions
        + d  # user token
        + cfg.num_profile_features * d
        + d  # input norm
        + d * cfg.d_context  # the one context projection
        + cfg.L_kv * cfg.S_kv * chunk  # k (and v) norms
    )


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_shapes_and_parameter_count(preset):
    cfg = OneRecV2Config.from_preset(preset)
    d, layers, heads = PAPER_SHAPES[preset]
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (d, layers, heads)
    assert cfg.d_head * cfg.n_heads == d
    assert cfg.ffn_hidden % 128 == 0 and 0 <= cfg.ffn_hidden - 8 / 3 * d < 128
    assert cfg.d_context == cfg.G_kv * cfg.d_head == d  # paper defaults: L_kv = S_kv = 1, G_kv = heads
    assert (cfg.codebook_size, cfg.n_levels) == (8192, 3)
    with torch.device("meta"):
        model = OneRecV2(cfg)
    for layer, block in enumerate(model.blocks):
        assert n_params(block) == expected_block_params(cfg, layer), f"block {layer}"
        assert block.cross_q.weight.shape == (d, d) and block.cross_o.weight.shape == (d, d)
        assert block.self_qkv.weight.shape == (3 * d, d) and block.self_o.weight.shape == (d, d)
        if cfg.is_moe_layer(layer):
            assert len(block.ffn.experts) == cfg.n_routed_experts
            assert block.ffn.experts[0].w1.weight.shape == (cfg.expert_hidden, d)
            assert block.ffn.router.weight.shape == (cfg.n_routed_experts, d)
        else:
            assert block.ffn.w1.weight.shape == (cfg.ffn_hidden, d)
            assert block.ffn.w2.weight.shape == (d, cfg.ffn_hidden)
    assert n_params(model.context) == expected_context_params(cfg)
    heads_and_targets = cfg.n_levels * (d * cfg.codebook_size + d) + cfg.n_levels * cfg.codebook_size * d
    heads_and_targets += d + cfg.n_levels * d  # BOS, target positions
    assert n_params(model) == (
        expected_context_params(cfg) + sum(expected_block_params(cfg, l) for l in range(layers)) + heads_and_targets
    )
    if preset == "moe-4b":
        moe_layers = [l for l in range(layers) if cfg.is_moe_layer(l)]
        assert moe_layers == list(range(2, layers))
        assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.moe_top_k, cfg.expert_hidden) == (53, 1, 3, 1408)


def test_every_preset_builds_and_reports_unknown():
    for name in PRESETS:
        OneRecV2Config.from_preset(name)
    with pytest.raises(KeyError, match="unknown preset"):
        OneRecV2Config.from_preset("3b")


# ---- small random models -----------------------------------------------------------------------


def random_model(seed: int = 0, **overrides) -> OneRecV2:
    torch.manual_seed(seed)
    cfg = OneRecV2Config(**{
        "d_model": 32, "n_layers": 3, "n_heads": 4, "G_kv": 2, "L_kv": 2, "S_kv": 2, "codebook_size": 8,
        "context_len": 12, "profile_features": ["a", "b"], **overrides,
    })
    model = OneRecV2(cfg).eval()
    with torch.no_grad():  # peaky distributions: ties between beams become impossible in practice
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def random_table(n_items: int, codebook: int, seed: int = 0, unknown: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = rng.choice(codebook**3, n_items, replace=False)
    table = np.stack([flat // codebook**2, flat // codebook % codebook, flat % codebook], 1).astype(np.int32)
    table[rng.choice(n_items, unknown, replace=False)] = -1
    return table


def random_inputs(model: OneRecV2, table: np.ndarray, users: int, seed: int = 0):
    from onerec.semantic_ids import encode_histories

    rng = np.random.default_rng(seed)
    histories = [rng.integers(0, len(table), rng.integers(0, 15)).tolist() for _ in range(users)]
    sids, mask, _ = encode_histories(histories, table, model.cfg.context_len)
    profile = torch.from_numpy(rng.normal(size=(users, 2)).astype(np.float32))
    return sids, mask, profile


@torch.no_grad()
def naive_beam_search(model: OneRecV2, sids, mask, profile, table: np.ndarray, beam_size: int, k: int):
    """Per-beam reference: every beam gets its own copy of its user's context K/V; Python sets for validity."""
    from onerec.model import ContextKV

    known = [tuple(int(c) for c in row) for row in table if (row >= 0).all()]
    item_of = {tuple(int(c) for c in row): i for i, row in enumerate(table) if (row >= 0).all()}
    valid = [{t[: l + 1] for t in known} for l in range(3)]
    ctx = model.encode_context(sids, mask, profile)
    items, scores = [], []
    for b in range(sids.shape[0]):
        beams = [((), 0.0)]
        for level in range(3):
            K = len(beams)
            def copy(t, b=b, K=K):
                return t[b : b + 1].expand(K, *t.shape[1:]).clone()

            per_beam = ContextKV([copy(t) for t in ctx.keys], [copy(t) for t in ctx.values], copy(ctx.mask))
            prefix = torch.tensor([p for p, _ in beams], dtype=torch.long).view(K, 1, level)
            logp = torch.log_softmax(model.next_level_logits(prefix, per_beam)[:, 0].float(), -1)
            cands = [
                (p + (c,), s + float(logp[i, c]))
                for i, (p, s) in enumerate(beams)
                for c in range(model.cfg.codebook_size)
                if p + (c,) in valid[level]
            ]
            beams = sorted(cands, key=lambda x: -x[1])[:beam_size]
        items.append([item_of[p] for p, _ in beams[:k]])
        scores.append([s for _, s in beams[:k]])
    return items, scores


@pytest.mark.parametrize("overrides", [{}, {"L_kv": 1, "S_kv": 1, "G_kv": 4}])
def test_shared_context_matches_per_beam_copies(overrides):
    model = random_model(**overrides)
    table = random_table(60, model.cfg.codebook_size)
    sids, mask, profile = random_inputs(model, table, users=3)
    with torch.no_grad():
        # Logits: K beams attending to one shared context == K rows with their own copy of it.
        ctx = model.encode_context(sids, mask, profile)
        prefix = torch.randint(0, 8, (3, 5, 2))
        shared = model.next_level_logits(prefix, ctx)
        from onerec.model import ContextKV

        rep = lambda t: t.repeat_interleave(5, dim=0)  # noqa: E731
        copied = ContextKV([rep(t) for t in ctx.keys], [rep(t) for t in ctx.values], rep(ctx.mask))
        per_beam = model.next_level_logits(prefix.reshape(15, 1, 2), copied).view(3, 5, -1)
        torch.testing.assert_close(shared, per_beam, rtol=1e-5, atol=1e-5)

        index = SemanticIdIndex.build(table, model.cfg.codebook_size)
    ref_items, ref_scores = naive_beam_search(model, sids, mask, profile, table, beam_size=12, k=10)
    for use_cache in (True, False):  # decoding with the self-attention KV cache, and without
        recs = beam_search(model, sids, mask, index, profile, beam_size=12, k=10, use_cache=use_cache)
        assert recs.items.tolist() == ref_items
        torch.testing.assert_close(recs.scores, torch.tensor(ref_scores), rtol=1e-5, atol=1e-5)


def test_beam_search_returns_valid_distinct_items_best_first():
    model = random_model(seed=1)
    table = random_table(80, model.cfg.codebook_size, seed=1, unknown=10)
    known = set(np.flatnonzero((table >= 0).all(1)).tolist())
    sids, mask, profile = random_inputs(model, table, users=4, seed=1)
    index = SemanticIdIndex.build(table, model.cfg.codebook_size)
    recs = beam_search(model, sids, mask, index, profile, beam_size=32, k=20)
    for items, scores in zip(recs.items.tolist(), recs.scores.tolist(), strict=True):
        assert set(items) <= known
        assert len(set(items)) == len(items)
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    # More asked for than exists: every known item once, then -1 padding with -inf scores.
    small = random_table(6, model.cfg.codebook_size, seed=2, unknown=1)
    recs = beam_search(model, sids, mask, SemanticIdIndex.build(small, 8), profile, beam_size=16, k=8)
    real = set(np.flatnonzero((small >= 0).all(1)).tolist())
    for items, scores in zip(recs.items.tolist(), recs.scores.tolist(), strict=True):
        assert set(items[:5]) == real and items[5:] == [-1, -1, -1]
        assert all(np.isinf(scores[5:])) and all(np.isfinite(scores[:5]))


def test_moe_matches_reference_token_loop():
    torch.manual_seed(0)
    cfg = OneRecV2Config(d_model=16, n_layers=2, n_heads=2, n_routed_experts=5, n_shared_experts=1,
                         moe_top_k=2, expert_hidden=8)
    moe = MoE(cfg)
    x = torch.randn(3, 7, 16)
    out = moe(x)
    ref = torch.zeros_like(x).view(-1, 16)
    for t, token in enumerate(x.view(-1, 16)):
        probs = torch.softmax(moe.router(token), -1)
        weights, experts = probs.topk(2)
        weights = weights / weights.sum()
        ref[t] = sum(w * moe.experts[int(e)](token) for w, e in zip(weights, experts, strict=True))
        ref[t] += moe.shared(token)
    torch.testing.assert_close(out, ref.view_as(x), rtol=1e-5, atol=1e-6)
    # The load-balancing loss: E * sum_e (share of routed slots) * (mean router probability).
    probs = torch.softmax(moe.router(x.view(-1, 16)), -1)
    chosen = torch.zeros(5)
    for e in probs.topk(2).indices.flatten():
        chosen[e] += 1
    torch.testing.assert_close(moe.aux_loss, 5 * (chosen / chosen.sum() * probs.mean(0)).sum())
    # One token: most experts idle, still correct.
    torch.testing.assert_close(moe(x[:1, :1]), out[:1, :1], rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = random_model(seed=3)
    model.context.profile_mean.copy_(torch.tensor([1.5, -2.0]))
    model.context.profile_std.copy_(torch.tensor([0.5, 3.0]))
    table = random_table(40, model.cfg.codebook_size, seed=3)
    save_checkpoint(model, table, tmp_path / "ck", extra=lambda f: (f / "notes.txt").write_text("hi"))
    manifest = verify_manifest(tmp_path / "ck")
    assert set(manifest) == {"config.json", "model.safetensors", "semantic_ids.npy", "notes.txt"}
    loaded, loaded_table = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == model.cfg
    assert loaded_table.dtype == np.int32 and np.array_equal(loaded_table, table)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    sids, mask, profile = random_inputs(model, table, users=2)
    target = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert torch.equal(model(sids, mask, target, profile), loaded(sids, mask, target, profile))


@pytest.mark.parametrize("victim", ["model.safetensors", "semantic_ids.npy", "config.json"])
def test_corrupted_checkpoint_fails_manifest_check_naming_the_file(tmp_path, victim):
    model = random_model(seed=4)
    save_checkpoint(model, random_table(30, 8, seed=4), tmp_path / "ck")
    path = tmp_path / "ck" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size: only the sha256 can tell
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=victim.replace(".", r"\.") + ".*sha256"):
        load_checkpoint(tmp_path / "ck")
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(UserError, match=victim.replace(".", r"\.") + ".*bytes"):
        verify_manifest(tmp_path / "ck")


def test_checkpoint_without_manifest_is_incomplete(tmp_path):
    save_checkpoint(random_model(seed=5), random_table(30, 8, seed=5), tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        load_checkpoint(tmp_path / "ck")


def test_hostile_weights_table_and_config_are_one_line_refusals(tmp_path):
    """A pickled semantic_ids.npy, a safetensors header bomb, a weights file too small for its config
    and sizes that multiply past any host: each a UserError, before anything large is allocated."""
    import json

    from onerec.checkpoint import load_weights
    from onerec.semantic_ids import load_table

    save_checkpoint(random_model(seed=6), random_table(30, 8, seed=6), tmp_path / "ck")
    ck = tmp_path / "ck"

    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="pickled.npy: not a plain .npy"):
        load_table(tmp_path / "pickled.npy")

    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")  # claims an exabyte header
    with pytest.raises(UserError, match="bomb.safetensors: not a safetensors file"):
        load_weights(bomb)
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes((40).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [9999999, 9999], "data_offsets": [0, 4]}}' + b"\0" * 8)
    with pytest.raises(UserError, match="lying.safetensors"):
        load_weights(lying)

    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "d_model": 4096, "n_heads": 32}))
    with pytest.raises(UserError, match="cannot hold the .* parameters"):
        load_checkpoint(ck, verify=False)
    with pytest.raises(ValueError, match="sizes together"):
        OneRecV2Config(d_model=65536, n_layers=1024, n_heads=1024, codebook_size=1 << 20)
