"""Constrained beam search over semantic IDs: BOS -> level 1 -> level 2 -> level 3.

The plain reference: straightforward PyTorch on `OneRecV2`. Each user's context K/V is
encoded once and shared by all of that user's beams (the decoder's cross-attention treats a
user's beams as extra query rows, see onerec/model.py); each step decodes only the newest token
of each beam through `OneRecV2.decode_step`, with a self-attention KV cache that follows the
parent beams (`use_cache=False` re-runs the whole target prefix instead, through
`next_level_logits`). The engine (onerec/engine) runs this same search on the model converted
with its own modules swapped in (other kernels, FP8 GEMMs), inside a CUDA graph. Only prefixes of
existing items survive: at each level a beam's candidates are the children of its prefix in the
`SemanticIdIndex`, scored by gathering their log-probabilities, and one top-k over beams x
children picks the next beams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onerec.model import ContextKV, OneRecV2
from onerec.semantic_ids import SemanticIdIndex


@dataclass
class Recommendations:
    items: torch.Tensor  # [B, k] item ids, best first; -1 where fewer than k valid items exist
    scores: torch.Tensor  # [B, k] summed log-probabilities of the items' code triples (-inf where items is -1)


def beam_step(
    logits: torch.Tensor, beam_scores: torch.Tensor, beam_prefix: torch.Tensor,
    index: SemanticIdIndex, level: int, beam_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One constrained step. logits [B, K, V] of the next code; beams' scores [B, K] and prefix ids [B, K].

    Returns the parent beam [B, K'], the new prefix ids [B, K'] and scores [B, K'], K' = min(beam,
    K * max_children). Dead beams (score -inf) never produce live children. Log-probabilities
    are formed for the valid children only (logit - logsumexp): no [B, K, V] log-softmax is written.
    """
    B, K, _ = logits.shape
    child, codes, valid = index.children(level, beam_prefix)  # [B, K, M]
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    cand = logits.gather(-1, codes).float() - lse + beam_scores[..., None]
    cand = cand.masked_fill(~valid, float("-inf"))
    M = cand.shape[-1]
    top_scores, flat = cand.view(B, K * M).topk(min(beam_size, K * M), dim=-1)
    parent = flat // M
    new_prefix = child.view(B, K * M).gather(1, flat)
    return parent, new_prefix, top_scores


@torch.no_grad()
def beam_search(
    model: OneRecV2,
    history_sids: torch.Tensor,
    history_mask: torch.Tensor,
    index: SemanticIdIndex,
    profile: torch.Tensor | None = None,
    beam_size: int = 128,
    k: int = 10,
    use_cache: bool = True,
    padded: bool | None = None,
) -> Recommendations:
    """Top-k items of each user. `padded` (is any history position masked?) is found out when None;
    a caller that knows it spares the host sync (the engine's CUDA graphs need that)."""
    if not 1 <= k <= beam_size:
        raise ValueError(f"need 1 <= k <= beam_size, got k={k}, beam_size={beam_size}")
    ctx: ContextKV = model.encode_context(history_sids, history_mask, profile, padded)
    B = history_sids.shape[0]
    device = history_sids.device
    n_levels = model.cfg.n_levels
    tokens = torch.zeros(B, 1, 0, dtype=torch.long, device=device)  # codes chosen so far (no cache)
    scores = torch.zeros(B, 1, device=device)
    prefix = torch.zeros(B, 1, dtype=torch.long, device=device)  # the empty prefix
    if use_cache:
        logits, cache = model.decode_step(None, ctx)
    for level in range(n_levels):
        if not use_cache:
            logits = model.next_level_logits(tokens, ctx)
        parent, prefix, scores = beam_step(logits, scores, prefix, index, level, beam_size)
        new_codes = index.codes[level][prefix]
        if not use_cache:
            tokens = torch.cat([tokens.gather(1, parent[..., None].expand(-1, -1, level)), new_codes[..., None]], dim=-1)
        elif level + 1 < n_levels:
            logits, cache = model.decode_step(new_codes, ctx, cache.select(parent))
    return finalize(prefix, scores, index, k)


def finalize(leaf: torch.Tensor, scores: torch.Tensor, index: SemanticIdIndex, k: int) -> Recommendations:
    """Final beams (leaf prefix ids, scores sorted best first) -> top-k items, -1 where a beam is dead."""
    items = index.leaf_item[leaf]
    B, K = items.shape
    if K < k:  # fewer valid items than k: pad
        pad = k - K
        items = torch.cat([items, items.new_full((B, pad), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((B, pad), float("-inf"))], dim=1)
    items, scores = items[:, :k], scores[:, :k]
    return Recommendations(items.masked_fill(torch.isinf(scores), -1), scores)
