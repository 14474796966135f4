"""The serving forward path of OneRec-V2: context once per user, then 3 cached beam-search steps.

Same function as `onerec.generate.beam_search(model, ...)` (same constrained top-k over beams x
children, same items), organised for speed:

- the context K/V are computed once per user and shared by the user's beams: cross-attention
  runs SDPA with the beams as query rows of one sequence per user (no expand, no copy), and
  without a mask (flash kernels) when no history in the batch is padded;
- a self-attention KV cache over the 3 target tokens: step t runs only token t of each beam
  (1 + 2 * beam rows per user instead of 1 + 2 * beam + 3 * beam in the plain search); BOS's
  K/V are per user, level-1's are gathered by parent beam once;
- the residual add of each sublayer is fused into the next RMSNorm, and for FP8 layers the
  RMSNorm / SiLU*mul kernels emit FP8 + per-token scales directly (onerec/engine/kernels.py);
  FP8 GEMMs go through `onerec.quant.fp8.scaled_mm_rowwise` (torch._scaled_mm, row-wise scales);
- w1|w3 are one GEMM (per-channel scales concatenate exactly); self_qkv is already one;
- on CUDA the whole request (context + 3 steps + top-k) has static shapes for a given batch
  bucket and history length, so it is captured once as a CUDA graph and replayed.

The same code runs a bf16 model (every optimisation but FP8), a bf16 model quantized on the fly
(`EngineConfig(fp8=True)`: per-channel weights, per-token activations) or a quantized model whose
Linear layers are `onerec.quant.fp8.FP8Linear` (taken as they are). On CPU it runs the torch
references, without graphs: that is what the tests compare against the plain model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onerec.engine import kernels
from onerec.generate import Recommendations, finalize
from onerec.model import MoE, OneRecV2
from onerec.quant.fp8 import FP8Linear, quantize_per_channel, scaled_mm_rowwise
from onerec.semantic_ids import SemanticIdIndex

log = logging.getLogger(__name__)


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


@dataclass
class EngineConfig:
    beam_size: int = 512
    k: int = 10
    # FP8 GEMMs: None = where the model already has FP8Linear layers; True = also quantize the
    # model's bf16 Linear layers (per-channel weights, per-token activations); False = bf16 only
    # (a model with FP8Linear layers keeps them: their weights exist only in FP8).
    fp8: bool | None = None
    quantize_context: bool = True  # with fp8=True: the context projection too
    cuda_graphs: bool = True  # CUDA only
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


class Linear:
    """One GEMM y = x W^T: bf16 weight, FP8 weight with per-channel scale, or a module fallback."""

    def __init__(self, weight=None, w_fp8=None, w_scale=None, module: nn.Module | None = None):
        self.weight, self.w_fp8, self.w_scale, self.module = weight, w_fp8, w_scale, module
        self.fp8 = w_fp8 is not None  # the input arrives as (x_fp8, per-token scale)

    @classmethod
    def from_module(cls, module: nn.Module, quantize: bool) -> Linear:
        if isinstance(module, FP8Linear):
            if (
                module.weight_granularity == "per_channel" and module.activation == "per_token"
                and module.bias is None
            ):
                return cls(w_fp8=module.weight_fp8, w_scale=module.weight_scale)
            return cls(module=module)  # other recipes: the layer's own forward on bf16 input
        if isinstance(module, nn.Linear) and module.bias is None:
            if quantize:
                w_fp8, w_scale = quantize_per_channel(module.weight.detach())
                return cls(w_fp8=w_fp8, w_scale=w_scale)
            return cls(weight=module.weight.detach())
        return cls(module=module)

    @classmethod
    def concat(cls, a: Linear, b: Linear) -> Linear | None:
        """[a; b] along outputs as one GEMM, or None where the two cannot share one."""
        if a.module is not None or b.module is not None or a.fp8 != b.fp8:
            return None
        if a.fp8:
            return cls(w_fp8=torch.cat([a.w_fp8, b.w_fp8]), w_scale=torch.cat([a.w_scale, b.w_scale]))
        return cls(weight=torch.cat([a.weight, b.weight]))

    def __call__(self, x, out_dtype: torch.dtype) -> torch.Tensor:
        if self.fp8:
            x_fp8, x_scale = x
            return scaled_mm_rowwise(x_fp8, x_scale.reshape(-1, 1), self.w_fp8, self.w_scale, out_dtype)
        if self.module is not None:
            return self.module(x)
        return F.linear(x, self.weight)


@dataclass
class _Block:
    cross_norm: torch.Tensor
    cross_q: Linear
    cross_o: Linear
    self_norm: torch.Tensor
    self_qkv: Linear
    self_o: Linear
    ffn_norm: torch.Tensor
    w13: Linear | None  # fused gate|up; None: the module fallback below
    w2: Linear | None
    ffn_module: nn.Module | None  # MoE (eager) or an FFN whose layers cannot be fused
    kv_set: int


class Engine:
    """Fast constrained beam search for one model + semantic-id index (see module doc)."""

    def __init__(self, model: OneRecV2, index: SemanticIdIndex, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model = model.eval()
        self.cfg = cfg = model.cfg
        self.device = model.token_embedding.weight.device
        self.dtype = model.token_embedding.weight.dtype
        self.index = index.to(self.device)
        if not 1 <= config.k <= config.beam_size:
            raise ValueError(f"need 1 <= k <= beam_size, got k={config.k}, beam_size={config.beam_size}")
        quantize = bool(config.fp8)
        self.eps = cfg.norm_eps
        ctx = model.context
        self.context_proj = Linear.from_module(ctx.proj, quantize and config.quantize_context)
        self.blocks = [self._prepare_block(b, quantize) for b in model.blocks]
        self.head_norms = [n.weight.detach() for n in model.head_norms]
        self.heads = [Linear.from_module(h, False) for h in model.heads]  # heads stay high precision
        self.fp8 = any(  # does any block GEMM run in FP8 (natively or through a FP8Linear fallback)?
            lin.fp8 or isinstance(lin.module, FP8Linear)
            for b in self.blocks for lin in (b.cross_q, b.cross_o, b.self_qkv, b.self_o)
        )
        # beams after each step: static for a given index, so every step has a static shape
        self.beams = []
        K = 1
        for level in range(cfg.n_levels):
            K = min(config.beam_size, K * index.max_children[level])
            self.beams.append(K)
        self._graphs: dict = {}
        self._pool = None

    def _prepare_block(self, blk, quantize: bool) -> _Block:
        ffn = blk.ffn
        w13 = w2 = ffn_module = None
        if isinstance(ffn, MoE):
            ffn_module = ffn
        else:
            w1, w3 = Linear.from_module(ffn.w1, quantize), Linear.from_module(ffn.w3, quantize)
            w13 = Linear.concat(w1, w3)
            w2 = Linear.from_module(ffn.w2, quantize)
            if w13 is None or w2.module is not None:
                w13 = w2 = None
                ffn_module = ffn
        return _Block(
            cross_norm=blk.cross_norm.weight.detach(),
            cross_q=Linear.from_module(blk.cross_q, quantize),
            cross_o=Linear.from_module(blk.cross_o, quantize),
            self_norm=blk.self_norm.weight.detach(),
            self_qkv=Linear.from_module(blk.self_qkv, quantize),
            self_o=Linear.from_module(blk.self_o, quantize),
            ffn_norm=blk.ffn_norm.weight.detach(),
            w13=w13, w2=w2, ffn_module=ffn_module, kv_set=blk.kv_set,
        )

    # -----------------------------------------------------------------------------------------
    # public API

    @torch.no_grad()
    def recommend(self, history_sids: torch.Tensor, history_mask: torch.Tensor,
                  profile: torch.Tensor | None = None) -> Recommendations:
        """Top-k items [B, k] and scores for B users (same contract as generate.beam_search)."""
        padded = not bool(history_mask.all())  # decided on the inputs' device, before any copy
        history_sids = history_sids.to(self.device)
        history_mask = history_mask.to(self.device)
        if profile is not None:
            profile = profile.to(self.device)
        use_graphs = (
            self.config.cuda_graphs and self.device.type == "cuda"
            and not any(b.ffn_module is not None for b in self.blocks)  # MoE dispatch syncs
        )
        if not use_graphs:
            return self._forward(history_sids, history_mask, profile, padded)
        return self._replay(history_sids, history_mask, profile, padded)

    # -----------------------------------------------------------------------------------------
    # CUDA graphs, one per (batch bucket, history length, padded)

    def bucket(self, batch: int) -> int:
        return next((b for b in self.config.batch_buckets if b >= batch), batch)

    def _replay(self, history_sids, history_mask, profile, padded) -> Recommendations:
        B, T = history_mask.shape
        Bb = self.bucket(B)
        if Bb > B:  # pad with copies of the first user: keeps the batch's masking unchanged
            fill = lambda t: None if t is None else torch.cat([t, t[:1].expand(Bb - B, *t.shape[1:])])
            history_sids, history_mask, profile = fill(history_sids), fill(history_mask), fill(profile)
        key = (Bb, T, padded, profile is not None)
        if key not in self._graphs:
            self._graphs[key] = self._capture(history_sids, history_mask, profile, padded)
        graph, inputs, out = self._graphs[key]
        for buf, new in zip(inputs, (history_sids, history_mask, profile), strict=True):
            if buf is not None:
                buf.copy_(new)
        graph.replay()
        return Recommendations(out.items[:B].clone(), out.scores[:B].clone())

    def _capture(self, history_sids, history_mask, profile, padded):
        log.info("capturing a CUDA graph: %d users x %d history, padded=%s", *history_mask.shape, padded)
        inputs = tuple(None if t is None else t.clone() for t in (history_sids, history_mask, profile))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles Triton kernels, creates cuBLAS handles and workspaces
                self._forward(*inputs, padded)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(*inputs, padded)
        return graph, inputs, out

    # -----------------------------------------------------------------------------------------
    # the forward path

    def _norm(self, x, weight, delta, linear: Linear):
        """x (+ delta) -> (new residual stream, the normed input of `linear` in its format)."""
        out = kernels.rmsnorm(x, weight, self.eps, residual=delta, quantize=linear.fp8)
        return (out[0], out[1:]) if linear.fp8 else out

    def _encode_context(self, history_sids, history_mask, profile):
        cfg = self.cfg
        seq, mask = self.model.context.embed(history_sids, history_mask, profile)
        B, T, d = seq.shape
        ctx = self.model.context
        _, h = self._norm(seq.reshape(B * T, d), ctx.input_norm.weight.detach(), None, self.context_proj)
        proj = self.context_proj(h, self.dtype)
        chunk = cfg.G_kv * cfg.d_head
        keys, values = [], []
        for l in range(cfg.L_kv):
            def kv(j, norm):
                part = proj[:, j * chunk:(j + 1) * chunk].contiguous()
                _, y = kernels.rmsnorm(part, norm.weight.detach(), self.eps)
                return y.view(B, T, cfg.G_kv, cfg.d_head).transpose(1, 2)

            k = kv(l * cfg.S_kv, ctx.k_norms[l])
            v = kv(l * cfg.S_kv + 1, ctx.v_norms[l]) if ctx.v_norms is not None else k
            keys.append(k)
            values.append(v)
        return keys, values, mask

    def _forward(self, history_sids, history_mask, profile, padded: bool) -> Recommendations:
        cfg, index = self.cfg, self.index
        keys, values, mask = self._encode_context(history_sids, history_mask, profile)
        attn_mask = mask[:, None, None, :] if padded else None
        B = history_sids.shape[0]
        model = self.model
        # step 0: BOS of each user (one row per user); its self-attention K/V are cached per user
        x = (model.bos.to(self.dtype) + model.target_position.weight[0].to(self.dtype)).expand(B, -1).contiguous()
        scores = torch.zeros(B, 1, device=self.device)
        prefix = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        cache: list[dict] = [{} for _ in self.blocks]
        parent = None
        K = 1
        for level in range(cfg.n_levels):
            if level > 0:
                codes = index.codes[level - 1][prefix].reshape(-1)
                row = codes + (level - 1) * cfg.codebook_size
                x = model.token_embedding(row) + model.target_position.weight[level].to(self.dtype)
            logits = self._decode_step(x, keys, values, attn_mask, cache, B, K, level, parent)
            parent, prefix, scores = self._constrained_topk(logits.view(B, K, -1), scores, prefix, level)
            K = self.beams[level]
        return finalize(prefix, scores, index, self.config.k)

    def _decode_step(self, x, keys, values, attn_mask, cache, B, K, t, parent):
        """Token t of every beam (x [B*K, d]) through all blocks -> next-level logits [B*K, V]."""
        cfg, dt = self.cfg, self.dtype
        H, dh = cfg.n_heads, cfg.d_head
        R = B * K
        delta = None
        for i, blk in enumerate(self.blocks):
            # lazy cross-attention: a user's beams are the query rows of one sequence
            x, h = self._norm(x, blk.cross_norm, delta, blk.cross_q)
            q = blk.cross_q(h, dt).view(B, K, H, dh).transpose(1, 2)
            k, v = keys[blk.kv_set], values[blk.kv_set]
            a = F.scaled_dot_product_attention(
                q, k.to(dt), v.to(dt), attn_mask=attn_mask, enable_gqa=cfg.G_kv != H,
            )
            a = a.transpose(1, 2).reshape(R, H * dh)
            delta = blk.cross_o(kernels.quantize_rows(a) if blk.cross_o.fp8 else a, dt)
            # causal self-attention of token t over the cached tokens 0..t of its beam
            x, h = self._norm(x, blk.self_norm, delta, blk.self_qkv)
            qkv = blk.self_qkv(h, dt).view(R, 3, H, dh)
            a = self._self_attention(qkv, cache[i], B, K, t, parent)
            delta = blk.self_o(kernels.quantize_rows(a) if blk.self_o.fp8 else a, dt)
            # FFN
            if blk.ffn_module is not None:
                x, h = kernels.rmsnorm(x, blk.ffn_norm, self.eps, residual=delta)
                delta = blk.ffn_module(h)
            else:
                x, h = self._norm(x, blk.ffn_norm, delta, blk.w13)
                a = kernels.silu_mul(blk.w13(h, dt), quantize=blk.w2.fp8)
                delta = blk.w2(a, dt)
        head = self.heads[t]
        x, h = self._norm(x, self.head_norms[t], delta, head)
        return head(h, dt)

    def _self_attention(self, qkv, cache: dict, B, K, t, parent):
        """qkv [R, 3, H, dh] of token t -> attention output [R, H * dh] over tokens 0..t.

        Token 0 (BOS) is one row per user; token 1 one row per level-1 beam, read through the
        parent index at t == 2 (no gathered copy of the cache).
        """
        R, _, H, dh = qkv.shape
        if t == 0:  # one key: softmax weight 1
            cache["first"] = qkv
            return qkv[:, 2].reshape(R, H * dh)
        if t == 1:
            cache["mid"] = qkv
            return kernels.cached_self_attention(qkv, cache["first"], None, None, B, t)
        return kernels.cached_self_attention(qkv, cache["first"], cache["mid"], parent.reshape(-1), B, t)

    def _constrained_topk(self, logits, beam_scores, beam_prefix, level):
        """generate.beam_step on logits: log-probabilities of only the valid children, one top-k."""
        B, K, V = logits.shape
        child, codes, valid = self.index.children(level, beam_prefix)  # [B, K, M]
        lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
        cand = logits.gather(-1, codes).float() - lse + beam_scores[..., None]
        cand = cand.masked_fill(~valid, float("-inf"))
        M = cand.shape[-1]
        top_scores, flat = cand.view(B, K * M).topk(min(self.config.beam_size, K * M), dim=-1)
        parent = flat // M
        new_prefix = child.view(B, K * M).gather(1, flat)
        return parent, new_prefix, top_scores
