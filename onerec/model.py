"""OneRec-V2 in one file: config and presets, Context Processor, Lazy Decoder, output heads.

(One file on purpose, as gpt-fast's model.py: the whole architecture reads top to bottom, which
is worth its ~500 lines.)

Follows "OneRec-V2 Technical Report" (arXiv 2508.20900):
- the user's context (a user/profile token plus the behaviour sequence) is projected once to
  d_context = S_kv * L_kv * G_kv * d_head and split into S_kv * L_kv chunks; each chunk is
  RMS-normalised into the keys/values of one KV set (S_kv == 1 ties K and V);
- a Lazy Decoder block is pre-RMSNorm with residuals around: lazy cross-attention (query and
  output projections only, grouped-query over the context K/V of set floor(l * L_kv / N)),
  causal self-attention over the target tokens [BOS, s1, s2], and a SwiGLU FFN or an MoE;
- one RMSNorm + Linear head per semantic-ID level; loss = mean cross-entropy over the levels.

The model sees items only through their semantic IDs (the tokenizer, onerec/semantic_ids.py):
a history item is the sum of its three level embeddings, so the parameter count does not grow
with the item catalogue and a new item with a known code triple is understood at once.

Decoding shape convention: the decoder runs on `[B, K, L]` prefixes (B users, K beams, L
tokens). Cross-attention flattens the K*L query rows of one user into one sequence attending to
that user's context K/V, so the context is shared by every beam without being copied.
`decode_step` decodes incrementally: one new token per beam, with a self-attention KV cache of the
earlier target tokens (`DecodeCache`), instead of re-running the whole prefix. In decoding, a
block's output branch is handed to the next norm unadded (`RMSNorm.add_norm`).

This file is the model only, in plain PyTorch: training and the plain beam search
(onerec/generate.py) run it as it is. The attention ops are modules without weights
(`ContextAttention`, `CachedSelfAttention`), like vLLM's attention layer. The serving engine
converts a copy of the module tree that shares these weights: it swaps in its own modules (fused
residual add + norm + FP8 output, one w1|w3 GEMM, Triton attention, the fused MoE op), the way
gpt-fast's convert_for_runtime swaps Linear layers (onerec/engine/convert.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from onerec.kernels.reference import attention, cached_self_attention, cross_attention  # plain SDPA ops


def _ceil_to(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


# Sane bounds on a config's sizes, checked before anything is allocated: a config file is input,
# and one with e.g. a million layers must fail at once, not hang building modules. Generous
# (the largest preset is well inside); (low, high) inclusive.
CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "d_model": (1, 65536), "n_layers": (1, 1024), "n_heads": (1, 1024), "ffn_hidden": (0, 262144),
    "L_kv": (1, 1024), "S_kv": (1, 2), "G_kv": (0, 1024), "context_len": (1, 1 << 20),
    "codebook_size": (2, 1 << 20), "n_levels": (1, 8), "n_routed_experts": (0, 4096),
    "n_shared_experts": (0, 64), "moe_top_k": (0, 64), "expert_hidden": (0, 262144), "moe_start_layer": (0, 1024),
}
MAX_PROFILE_FEATURES = 1024
# Sizes each within bounds can still multiply to more than any host holds: the estimate below
# must stay under 2**36 (69e9) parameters; the 8b preset has about 5e9.
MAX_PARAMETERS = 1 << 36


def approx_parameters(cfg) -> int:
    """The main weights' parameter count (attention, FFN or experts, item embeddings and heads), from
    the sizes alone: a lower bound of the real count, computed before anything is allocated."""
    d = cfg.d_model
    ffn = cfg.ffn_hidden or _ceil_to(8 / 3 * d, 128)
    moe_layers = max(0, cfg.n_layers - cfg.moe_start_layer) if cfg.n_routed_experts else 0
    experts = (cfg.n_routed_experts + cfg.n_shared_experts) * 3 * d * cfg.expert_hidden
    layers = cfg.n_layers * 4 * d * d + (cfg.n_layers - moe_layers) * 3 * d * ffn + moe_layers * experts
    return layers + 2 * cfg.n_levels * cfg.codebook_size * d


def check_config_bounds(cfg) -> None:
    """Raise ValueError naming the first size that is not an integer within CONFIG_BOUNDS, or when
    the sizes together exceed MAX_PARAMETERS."""
    for name, (low, high) in CONFIG_BOUNDS.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    if (n := approx_parameters(cfg)) > MAX_PARAMETERS:
        raise ValueError(f"the sizes together make about {n:.3g} parameters, more than {MAX_PARAMETERS:.3g}")
    n_features = len(cfg.profile_features) + len(cfg.categorical_features)
    if n_features > MAX_PROFILE_FEATURES:
        raise ValueError(f"profile features: {n_features} > {MAX_PROFILE_FEATURES} (numeric and categorical)")


@dataclass
class OneRecV2Config:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ffn_hidden: int = 0  # 0: SwiGLU width ceil(8/3 * d_model) to a multiple of 128
    # Context Processor (paper defaults L_kv = 1, S_kv = 1, G_kv = n_heads)
    L_kv: int = 1
    S_kv: int = 1
    G_kv: int = 0  # 0: n_heads
    context_len: int = 3000  # history items kept (the newest); training ~512, serving ~3000
    # Semantic IDs
    codebook_size: int = 8192
    n_levels: int = 3
    # Profile features (numeric, normalised inside the model by stored mean/std buffers)
    profile_features: list[str] = field(default_factory=list)
    # Categorical profile features: name -> vocabulary (bucket i + 1 = value i, 0 = unknown);
    # see onerec/features.py. Their bucket ids follow the numeric values in the profile tensor.
    categorical_features: dict[str, list[str]] = field(default_factory=dict)
    # MoE (0 routed experts: every block dense)
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    moe_top_k: int = 0
    expert_hidden: int = 0
    moe_start_layer: int = 0  # blocks with index >= this use MoE
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        # One canonical order (by name): config.json stores keys sorted, and the order fixes each
        # feature's column in the profile tensor and its rows in the embedding table.
        vocabularies = self.categorical_features
        if not isinstance(vocabularies, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in vocabularies.values()
        ):
            raise ValueError("categorical_features must map each feature name to a list of strings")
        self.categorical_features = {n: list(v) for n, v in sorted(vocabularies.items())}
        check_config_bounds(self)
        if self.ffn_hidden == 0:
            self.ffn_hidden = _ceil_to(8 / 3 * self.d_model, 128)
        if self.G_kv == 0:
            self.G_kv = self.n_heads
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.G_kv:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of G_kv {self.G_kv}")
        if self.S_kv not in (1, 2):
            raise ValueError(f"S_kv must be 1 (tied K/V) or 2, got {self.S_kv}")
        if not 1 <= self.L_kv <= self.n_layers:
            raise ValueError(f"L_kv must be in 1..n_layers, got {self.L_kv}")
        if self.n_routed_experts and not (0 < self.moe_top_k <= self.n_routed_experts and self.expert_hidden):
            raise ValueError("MoE needs 0 < moe_top_k <= n_routed_experts and expert_hidden > 0")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_context(self) -> int:
        return self.S_kv * self.L_kv * self.G_kv * self.d_head

    @property
    def num_profile_features(self) -> int:
        return len(self.profile_features)

    @property
    def profile_columns(self) -> list[str]:
        """The columns of the profile tensor: numeric features, then categorical ones."""
        return list(self.profile_features) + list(self.categorical_features)

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.moe_start_layer

    def kv_set(self, layer: int) -> int:
        return layer * self.L_kv // self.n_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OneRecV2Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown OneRecV2Config fields: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> OneRecV2Config:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> OneRecV2Config:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# d_model / layers / heads from the paper; FFN width is not published (see __post_init__).
PRESETS: dict[str, dict] = {
    # CPU presets with the same structure, for tests, the demo and CI.
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, codebook_size=64, context_len=50),
    "tiny-moe": dict(
        d_model=64, n_layers=3, n_heads=2, codebook_size=64, context_len=50,
        n_routed_experts=4, n_shared_experts=1, moe_top_k=2, expert_hidden=64, moe_start_layer=1,
    ),
    "small": dict(d_model=256, n_layers=4, n_heads=4, codebook_size=256, context_len=200),
    "0.1b": dict(d_model=640, n_layers=12, n_heads=10),
    "0.2b": dict(d_model=896, n_layers=12, n_heads=14),
    "0.5b": dict(d_model=1408, n_layers=14, n_heads=11),
    "1b": dict(d_model=1792, n_layers=18, n_heads=14),
    "2b": dict(d_model=2304, n_layers=22, n_heads=18),
    "4b": dict(d_model=2944, n_layers=26, n_heads=23),
    "8b": dict(d_model=3584, n_layers=34, n_heads=28),
    # MoE on the 0.5b base: 53 routed + 1 shared expert, top-3, hidden 1408, MoE after block 2.
    "moe-4b": dict(
        d_model=1408, n_layers=14, n_heads=11,
        n_routed_experts=53, n_shared_experts=1, moe_top_k=3, expert_hidden=1408, moe_start_layer=2,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        """(x + residual, RMSNorm(x + residual)): the decoding step's residual add, done by the norm
        after it (a serving norm fuses the two)."""
        x = x if residual is None else x + residual
        return x, self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            # One op (one kernel on CUDA) instead of eight: F.rms_norm computes in fp32 for bf16
            # inputs, the same result as the explicit ops below (tests/unit/test_engine.py checks it).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32: bf16 sums of squares lose too much at d_model in the thousands.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus shared experts.

    Dispatch is vectorised: token-expert pairs are sorted by expert once and each expert runs on
    its contiguous slice (a loop over experts, never over tokens).
    """

    def __init__(self, cfg: OneRecV2Config):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.expert_hidden) for _ in range(cfg.n_routed_experts))
        self.shared = (
            SwiGLU(cfg.d_model, cfg.expert_hidden * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.aux_loss = torch.zeros(())

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities [N, E], top-k weights [N, k] (renormalised) and expert ids [N, k]."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return probs, weights / weights.sum(-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, weights, experts = self.route(x)
        n_experts = probs.shape[-1]
        if self.training:
            # Switch-Transformer load-balancing loss: fraction routed x mean probability per expert.
            frac = torch.bincount(experts.flatten(), minlength=n_experts).float() / experts.numel()
            self.aux_loss = n_experts * (frac * probs.mean(0)).sum()
        flat_expert = experts.flatten()
        order = flat_expert.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(flat_expert, minlength=n_experts).tolist()
        routed_in = x[token]
        routed_out = torch.empty_like(routed_in)
        start = 0
        for e, n in enumerate(counts):
            if n:
                routed_out[start : start + n] = self.experts[e](routed_in[start : start + n])
            start += n
        routed_out = routed_out * weights.flatten()[order, None].to(routed_out.dtype)
        out = torch.zeros_like(x).index_add_(0, token, routed_out)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)


@dataclass
class ContextKV:
    """Per-user keys/values of the context, computed once per request and shared by all beams."""

    keys: list[torch.Tensor]  # L_kv tensors [B, G_kv, T, d_head]
    values: list[torch.Tensor]  # same; the same tensors as keys when S_kv == 1
    mask: torch.Tensor  # [B, T] bool, True where a context position is real
    # False when no position is padded: cross-attention then runs without a mask, which lets SDPA
    # use its fastest (flash) kernels; True (the safe default) always applies the mask.
    padded: bool = True
    # [B] int32: each user's first real position. The real keys of a user are contiguous, from
    # here to the end (history left-padded, the user token last), so a variable-length attention
    # kernel reads only those (onerec/kernels: lengths as device-side metadata, no host sync).
    key_start: torch.Tensor | None = None
    kernel_cache: dict = field(default_factory=dict, repr=False)  # per-request layouts a kernel derives once


@dataclass
class DecodeCache:
    """Self-attention q|k|v of the target tokens decoded so far (incremental decoding).

    tokens[j][i]: block i's q|k|v rows of token j, [users * beams_j, 3, n_heads, d_head] (row
    user * beams_j + beam), kept as computed; rows[j] [users * beams]: each current beam's row in
    tokens[j] (its ancestor at token j). `select(parent)` after a beam-search step composes the
    rows with the chosen parents: the cache itself is never copied or reordered.
    """

    tokens: list[list[torch.Tensor]]
    rows: list[torch.Tensor]
    beams: int  # beams per user

    @property
    def length(self) -> int:
        return len(self.tokens)

    def select(self, parent: torch.Tensor) -> DecodeCache:
        """parent [B, K'] (a beam index within its user, per new beam) -> the cache of the new beams."""
        B, new_beams = parent.shape
        beam_row = (torch.arange(B, device=parent.device)[:, None] * self.beams + parent).reshape(-1)
        return DecodeCache(self.tokens, [r[beam_row] for r in self.rows], new_beams)


class ContextAttention(nn.Module):
    """Cross-attention's op: query rows q [B, H, N, d_head] (a user's beams x tokens) over that
    user's context keys/values [B, G, T, d_head] (G divides H), the padding masked -> [B, H, N, d_head]."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ContextKV) -> torch.Tensor:
        return cross_attention(q, k, v, ctx.mask if ctx.padded else None)


class CachedSelfAttention(nn.Module):
    """Decoding's causal self-attention op: the newest token's q|k|v [R, 3, H, d_head] over its beam's
    earlier tokens (`DecodeCache`: past[j] rows, each beam's row rows[j]) -> [R, H * d_head]."""

    def forward(self, qkv: torch.Tensor, past: list, rows: list) -> torch.Tensor:
        return cached_self_attention(qkv, past, rows)


class ContextProcessor(nn.Module):
    def __init__(self, cfg: OneRecV2Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        # A history item is the sum of its level embeddings (row level * codebook + code).
        self.item_embedding = nn.Embedding(cfg.n_levels * cfg.codebook_size, d)
        # Position counted back from the newest item (0 = newest): recency, not absolute index.
        self.position_embedding = nn.Embedding(cfg.context_len, d)
        # Always-present user token: carries the profile, and keeps an empty history attendable.
        self.user_token = nn.Parameter(torch.zeros(d))
        p = cfg.num_profile_features
        self.profile_proj = nn.Linear(p, d, bias=False) if p else None
        self.register_buffer("profile_mean", torch.zeros(p))
        self.register_buffer("profile_std", torch.ones(p))
        # One table for all categorical features (feature f's rows start at offsets[f]). The sizes
        # and offsets are stored with the weights (every loader then restores them, meta-device
        # construction included); models without categorical features have neither.
        sizes = [len(v) + 1 for v in cfg.categorical_features.values()]
        self.category_embedding = nn.Embedding(sum(sizes), d) if sizes else None
        if sizes:
            self.register_buffer("category_sizes", torch.tensor(sizes, dtype=torch.long))
            self.register_buffer("category_offsets", torch.tensor([sum(sizes[:i]) for i in range(len(sizes))]))
        self.input_norm = RMSNorm(d, cfg.norm_eps)
        self.proj = nn.Linear(d, cfg.d_context, bias=False)
        chunk = cfg.G_kv * cfg.d_head
        self.k_norms = nn.ModuleList(RMSNorm(chunk, cfg.norm_eps) for _ in range(cfg.L_kv))
        self.v_norms = nn.ModuleList(RMSNorm(chunk, cfg.norm_eps) for _ in range(cfg.L_kv)) if cfg.S_kv == 2 else None

    def embed(self, history_sids: torch.Tensor, history_mask: torch.Tensor, profile: torch.Tensor | None):
        """[B, T, n_levels] codes (left-padded: newest last) -> context sequence [B, T + 1, d] (the
        history, then the user token) and its mask."""
        cfg = self.cfg
        B, T, _ = history_sids.shape
        if T > cfg.context_len:
            raise ValueError(f"history length {T} exceeds context_len {cfg.context_len}")
        offsets = torch.arange(cfg.n_levels, device=history_sids.device) * cfg.codebook_size
        rows = (history_sids.clamp(min=0) + offsets).masked_fill(~history_mask[..., None], 0)
        # Sum of the level embeddings as one bag per item: no [B, T, n_levels, d] intermediate.
        items = F.embedding_bag(rows.reshape(-1, cfg.n_levels), self.item_embedding.weight, mode="sum")
        items = items.view(B, T, -1)
        recency = torch.arange(T - 1, -1, -1, device=history_sids.device)
        items = items + self.position_embedding(recency)
        items = items * history_mask[..., None].to(items.dtype)
        user = self.user_token.to(items.dtype).expand(B, 1, -1)
        if self.profile_proj is not None:
            if profile is None:
                raise ValueError(f"this model needs profile features {cfg.profile_features}")
            z = (profile[:, : len(cfg.profile_features)].float() - self.profile_mean) / self.profile_std
            user = user + self.profile_proj(z.to(self.profile_proj.weight.dtype))[:, None, :].to(items.dtype)
        if self.category_embedding is not None:
            if profile is None or profile.shape[1] != len(cfg.profile_columns):
                raise ValueError(f"this model needs profile columns {cfg.profile_columns}")
            codes = profile[:, len(cfg.profile_features):].float().long()
            codes = codes.masked_fill((codes < 0) | (codes >= self.category_sizes), 0)  # out of range: unknown
            user = user + self.category_embedding(codes + self.category_offsets).sum(1)[:, None, :].to(items.dtype)
        # The user token goes last: attention is order-free over keys (positions are embedded), and
        # so every user's real positions form one block at the end of its row.
        seq = torch.cat([items, user], dim=1)
        mask = torch.cat([history_mask, torch.ones(B, 1, dtype=torch.bool, device=seq.device)], dim=1)
        return seq, mask

    def forward(self, history_sids, history_mask, profile=None, padded: bool | None = None) -> ContextKV:
        """padded: whether any history position is masked; None finds out (a host sync)."""
        cfg = self.cfg
        seq, mask = self.embed(history_sids, history_mask, profile)
        B, T, _ = seq.shape
        chunks = self.proj(self.input_norm(seq)).split(cfg.G_kv * cfg.d_head, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, cfg.G_kv, cfg.d_head).transpose(1, 2)

        keys, values = [], []
        for l in range(cfg.L_kv):
            k = heads(self.k_norms[l](chunks[l * cfg.S_kv]))
            v = heads(self.v_norms[l](chunks[l * cfg.S_kv + 1])) if self.v_norms is not None else k
            keys.append(k)
            values.append(v)
        key_start = (T - mask.sum(1)).to(torch.int32)  # real positions are the last ones (see embed)
        return ContextKV(keys, values, mask, padded=not bool(mask.all()) if padded is None else padded,
                         key_start=key_start)


class LazyDecoderBlock(nn.Module):
    def __init__(self, cfg: OneRecV2Config, layer: int):
        super().__init__()
        self.cfg = cfg
        self.kv_set = cfg.kv_set(layer)
        d, inner = cfg.d_model, cfg.n_heads * cfg.d_head
        self.cross_norm = RMSNorm(d, cfg.norm_eps)
        self.cross_q = nn.Linear(d, inner, bias=False)
        self.cross_o = nn.Linear(inner, d, bias=False)
        self.self_norm = RMSNorm(d, cfg.norm_eps)
        self.self_qkv = nn.Linear(d, 3 * inner, bias=False)
        self.self_o = nn.Linear(inner, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer) else SwiGLU(d, cfg.ffn_hidden)
        self.cross_attn = ContextAttention()
        self.cached_self_attn = CachedSelfAttention()

    def cross_attend(self, h, ctx: ContextKV) -> torch.Tensor:
        """Normed h [B, N, d] (N = beams * tokens of one user) attends to that user's context."""
        cfg = self.cfg
        B, N, _ = h.shape
        q = self.cross_q(h).view(B, N, cfg.n_heads, cfg.d_head).transpose(1, 2)
        out = self.cross_attn(q, ctx.keys[self.kv_set], ctx.values[self.kv_set], ctx)
        return self.cross_o(out.transpose(1, 2).reshape(B, N, -1))

    def cross_attention(self, x: torch.Tensor, ctx: ContextKV) -> torch.Tensor:
        return self.cross_attend(self.cross_norm(x), ctx)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, L, d]: S independent target sequences (users x beams), causal over L tokens."""
        cfg = self.cfg
        S, L, _ = x.shape
        qkv = self.self_qkv(self.self_norm(x)).view(S, L, 3, cfg.n_heads, cfg.d_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, is_causal=True)
        return self.self_o(out.transpose(1, 2).reshape(S, L, -1))

    def decode_step(self, x: torch.Tensor, branch: torch.Tensor | None, ctx: ContextKV, past: list, rows: list):
        """One new token per beam: x [B, K, d] and the previous block's output branch, not yet added.

        past/rows: this block's q|k|v of the earlier tokens and each beam's rows in them
        (DecodeCache). Returns (x, this block's branch, this token's q|k|v [B * K, 3, H, d_head]).
        """
        cfg = self.cfg
        B, K, d = x.shape
        x, h = self.cross_norm.add_norm(x, branch)
        branch = self.cross_attend(h, ctx)
        x, h = self.self_norm.add_norm(x, branch)
        qkv = self.self_qkv(h).view(B * K, 3, cfg.n_heads, cfg.d_head)
        out = self.cached_self_attn(qkv, past, rows)
        x, h = self.ffn_norm.add_norm(x, self.self_o(out).view(B, K, d))
        return x, self.ffn(h), qkv

    def forward(self, x: torch.Tensor, ctx: ContextKV) -> torch.Tensor:
        """x [B, K, L, d] -> [B, K, L, d]."""
        B, K, L, d = x.shape
        x = x + self.cross_attention(x.reshape(B, K * L, d), ctx).view(B, K, L, d)
        x = x + self.self_attention(x.reshape(B * K, L, d)).view(B, K, L, d)
        return x + self.ffn(self.ffn_norm(x))


class OneRecV2(nn.Module):
    def __init__(self, cfg: OneRecV2Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.context = ContextProcessor(cfg)
        self.bos = nn.Parameter(torch.zeros(d))
        # Decoder token j >= 1 is code s_j of level j-1: row (j-1) * codebook + code.
        self.token_embedding = nn.Embedding(cfg.n_levels * cfg.codebook_size, d)
        self.target_position = nn.Embedding(cfg.n_levels, d)
        self.blocks = nn.ModuleList(LazyDecoderBlock(cfg, l) for l in range(cfg.n_layers))
        self.head_norms = nn.ModuleList(RMSNorm(d, cfg.norm_eps) for _ in range(cfg.n_levels))
        self.heads = nn.ModuleList(nn.Linear(d, cfg.codebook_size, bias=False) for _ in range(cfg.n_levels))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def encode_context(self, history_sids, history_mask, profile=None, padded: bool | None = None) -> ContextKV:
        return self.context(history_sids, history_mask, profile, padded)

    def embed_targets(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix [B, K, L-1] codes s1..s_{L-1} -> decoder input [B, K, L, d] = [BOS, s1, ...]."""
        B, K, n = prefix.shape
        levels = torch.arange(n, device=prefix.device) * self.cfg.codebook_size
        tokens = self.token_embedding(prefix + levels)
        bos = self.bos.to(tokens.dtype).expand(B, K, 1, -1)
        x = torch.cat([bos, tokens], dim=2)
        return x + self.target_position.weight[: n + 1].to(x.dtype)

    def decode(self, prefix: torch.Tensor, ctx: ContextKV) -> torch.Tensor:
        """Hidden states [B, K, L, d] of the target tokens [BOS, prefix...]."""
        x = self.embed_targets(prefix)
        for block in self.blocks:
            x = block(x, ctx)
        return x

    def level_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        return self.heads[level](self.head_norms[level](hidden))

    def next_level_logits(self, prefix: torch.Tensor, ctx: ContextKV) -> torch.Tensor:
        """Logits [B, K, codebook] of the next code after `prefix` [B, K, level]."""
        level = prefix.shape[-1]
        hidden = self.decode(prefix, ctx)[:, :, -1]
        return self.level_logits(hidden, level)

    def decode_step(
        self, codes: torch.Tensor | None, ctx: ContextKV, cache: DecodeCache | None = None,
    ) -> tuple[torch.Tensor, DecodeCache]:
        """One incremental decoding step -> (logits [B, K, codebook] of the next level, the new cache).

        codes None (and no cache): the BOS step, one beam per user. Otherwise `codes` [B, K] are the
        codes of level t-1 just chosen for each beam and `cache` holds tokens 0..t-1 of those same
        beams (`cache.select(parent)` after the beam step). The logits equal `next_level_logits`
        on the whole prefix, without re-running the earlier tokens.
        """
        cfg = self.cfg
        dtype = self.token_embedding.weight.dtype
        if codes is None:
            level = 0
            x = self.bos.to(dtype).expand(ctx.mask.shape[0], 1, -1)
        else:
            level = cache.length
            x = self.token_embedding(codes + (level - 1) * cfg.codebook_size)
        x = x + self.target_position.weight[level].to(x.dtype)
        B, K, _ = x.shape
        tokens, rows = (cache.tokens, cache.rows) if cache is not None else ([], [])
        branch, qkvs = None, []
        for i, block in enumerate(self.blocks):
            x, branch, qkv = block.decode_step(x, branch, ctx, [t[i] for t in tokens], rows)
            qkvs.append(qkv)
        _, h = self.head_norms[level].add_norm(x, branch)
        new_rows = [*rows, torch.arange(B * K, device=x.device)]
        return self.heads[level](h), DecodeCache([*tokens, qkvs], new_rows, beams=K)

    def forward(self, history_sids, history_mask, target_sids, profile=None) -> torch.Tensor:
        """Teacher-forced logits [B, n_levels, codebook] for the target items' codes [B, n_levels]."""
        ctx = self.encode_context(history_sids, history_mask, profile)
        hidden = self.decode(target_sids[:, None, :-1], ctx)[:, 0]
        return torch.stack([self.level_logits(hidden[:, j], j) for j in range(self.cfg.n_levels)], dim=1)

    @staticmethod
    def loss(logits: torch.Tensor, target_sids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the semantic-ID levels."""
        return F.cross_entropy(logits.flatten(0, 1).float(), target_sids.flatten())

    def moe_aux_loss(self) -> torch.Tensor:
        losses = [b.ffn.aux_loss for b in self.blocks if isinstance(b.ffn, MoE)]
        return torch.stack(losses).mean() if losses else torch.zeros(())
