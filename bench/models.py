"""Random models, semantic-id tables and requests of the benchmark (same weights and inputs for every variant)."""

from __future__ import annotations

from onerec.engine.timing import random_index, random_requests  # noqa: F401  (the benchmark's inputs)


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


def overlap(a, b) -> float:
    """Mean top-k overlap of two [users, k] item tensors (onerec.evaluate.topk_overlap)."""
    from onerec.evaluate import topk_overlap

    return topk_overlap(a.cpu().numpy(), b.cpu().numpy(), a.shape[1])
