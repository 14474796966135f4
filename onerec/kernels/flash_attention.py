"""Cross-attention over the shared context with FlashAttention-2's variable-length kernel (the build
inside torch, `aten::_flash_attention_forward`), reading only each user's real keys.

A batch's contexts are left-padded to one length S (a history bucket), with the user token last,
so user b's real keys are the contiguous block key_start[b]..S-1 of its row. The kernel takes the
rows as one packed sequence list: queries of user b are rows b*N..(b+1)*N-1 (its beams), its keys
start at b*S + key_start[b] (`cu_seqlens_k`) and it uses S - key_start[b] of them (`seqused_k`).
So padding costs no attention work and needs no mask (SDPA with a mask falls back from flash to a
kernel that took 1.21-1.26x the time of the whole unmasked search at 3000 context positions on an
H200, 2026-12-04: bench/results/engine_history_buckets_nvidia_h200.json). The offsets are device
tensors derived once per request and step (`varlen_layout`): no host sync, CUDA-graph safe.
"""

from __future__ import annotations

import torch


def supported(q: torch.Tensor) -> bool:
    """FlashAttention-2 runs this query: CUDA, 16-bit, head size a multiple of 8 up to 256, sm80+."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def varlen_layout(key_start: torch.Tensor, S: int, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cu_seqlens_q [B+1], cu_seqlens_k [B+1], seqused_k [B]) int32 for B users of N query rows each
    over keys laid out [B, S] with user b's real keys from key_start[b] to S-1."""
    B = key_start.shape[0]
    users = torch.arange(B + 1, device=key_start.device, dtype=torch.int32)
    cu_q = users * N
    starts = users[:-1] * S + key_start.to(torch.int32)
    cu_k = torch.cat([starts, users[-1:] * S])
    return cu_q, cu_k, (S - key_start).to(torch.int32)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor,
                    cache: dict | None = None) -> torch.Tensor:
    """q [B, H, N, dh] over k/v [B, G, S, dh] (G divides H), real keys key_start[b]..S-1 -> [B, H, N, dh]."""
    B, H, N, dh = q.shape
    G, S = k.shape[1], k.shape[2]
    key = ("varlen", S, N)
    layout = None if cache is None else cache.get(key)
    if layout is None:
        layout = varlen_layout(key_start, S, N)
        if cache is not None:
            cache[key] = layout
    cu_q, cu_k, used_k = layout
    # [B, N, H, dh] and [B, S, G, dh] are the tensors' memory layouts here: these reshapes are views
    qv = q.transpose(1, 2).reshape(B * N, H, dh)
    kv = k.transpose(1, 2).reshape(B * S, G, dh)
    vv = kv if v is k else v.transpose(1, 2).reshape(B * S, G, dh)
    out = flash_varlen(qv, kv, vv, cu_q, cu_k, N, S, used_k)
    return out.view(B, N, H, dh).transpose(1, 2)


def flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, used_k) -> torch.Tensor:
    """FlashAttention-2 over packed rows: sequence b's queries q[cu_q[b]:cu_q[b+1]] attend to
    k/v[cu_k[b] : cu_k[b] + used_k[b]] (no mask, no dropout, softmax scale 1/sqrt(d_head))."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                   seqused_k=used_k)[0]
