"""`onerec-fp8 eval`: offline recall@K / NDCG@K of a checkpoint or a quantized model.

Protocol: leave-last-out (onerec/data.py). Each test (or validation) request has one held-out
target; `--positions N` scores each user's last N interactions, each one a request predicted
from the items before it (the result says how many users and positions). The model's top-K
comes from constrained beam search, so
    recall@K = share of requests whose target is in the top K (hit rate, one target each),
    ndcg@K   = mean of 1 / log2(rank + 2) over hits (rank 0-based), 0 for misses.
Targets unknown to the tokenizer (items never seen in training) stay in the denominator as
misses: no model can produce them, and dropping them would flatter every number.

Baseline: the K items with the most training interactions (onerec.data.training_interactions),
the same list for every user. Nothing is excluded from either list, neither the user's history
nor anything else: the model and the baseline are scored under exactly the same rules, and the
synthetic data sets rarely repeat an item anyway.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from onerec.devices import resolve_device
from onerec.errors import UserError

log = logging.getLogger(__name__)


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean over rows of |set(a[:k]) & set(b[:k])| / k (padding -1 never counts)."""
    if len(a) == 0:
        return 1.0
    shared = [len((set(x[:k].tolist()) & set(y[:k].tolist())) - {-1}) for x, y in zip(a, b, strict=True)]
    return float(np.mean(shared)) / k


def recommend(model, table: np.ndarray, requests, k: int = 10, beam_size: int = 64, batch_size: int = 256,
              device=None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids [N, k] (-1 where fewer than k valid items exist) and their scores [N, k]."""
    import torch  # heavy: torch
    from tqdm import tqdm  # heavy: tqdm

    from onerec.data import iter_batches  # heavy: pandas, torch
    from onerec.generate import beam_search  # heavy: torch
    from onerec.semantic_ids import SemanticIdIndex  # heavy: torch

    device = resolve_device(device)
    cfg = model.cfg
    index = SemanticIdIndex.build(table, cfg.codebook_size).to(device)
    beam_size = max(beam_size, k)
    items, scores = [], []
    batches = iter_batches(requests, table, cfg.context_len, cfg.profile_features, batch_size,
                           categorical=cfg.categorical_features)
    total = (len(requests) + batch_size - 1) // batch_size
    model.eval()
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="recommend", file=sys.stderr, disable=not progress, leave=False):
            b = batch.to(device)
            recs = beam_search(model, b.history_sids, b.history_mask, index, b.profile, beam_size=beam_size, k=k)
            items.append(recs.items.cpu().numpy())
            scores.append(recs.scores.float().cpu().numpy())
    if not items:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return np.concatenate(items), np.concatenate(scores)


def per_user_metrics(recommended: np.ndarray, targets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: hit (1.0 / 0.0, the row's recall@k) and its ndcg@k gain."""
    top = recommended[:, :k]
    hit = top == np.asarray(targets)[:, None]
    rank = np.where(hit.any(1), hit.argmax(1), -1)
    gains = np.where(rank >= 0, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)
    return hit.any(1).astype(np.float64), gains


def ranking_metrics(recommended: np.ndarray, targets: np.ndarray, k: int) -> dict:
    """recall@k and ndcg@k for one target per row (see module doc)."""
    hits, gains = per_user_metrics(recommended, targets, k)
    n = len(hits)
    return {
        f"recall@{k}": float(hits.mean()) if n else 0.0,
        f"ndcg@{k}": float(gains.mean()) if n else 0.0,
        "num_users": int(n),
    }


def evaluate(model, table: np.ndarray, requests, k: int = 10, beam_size: int = 64, batch_size: int = 256,
             device=None, progress: bool = False) -> dict:
    """recall@k, ndcg@k and num_users of the model's beam-search top-k on a request table."""
    items, _ = recommend(model, table, requests, k, beam_size, batch_size, device, progress)
    return ranking_metrics(items, requests["target"].to_numpy(np.int64), k)


def popularity_baseline(dataset, requests, k: int = 10, positions: int = 1) -> dict:
    """The most-popular-items baseline, keys prefixed `popularity_` (counted without the held-out positions)."""
    from onerec.data import training_interactions  # heavy: pandas, torch

    counts = training_interactions(dataset, positions=positions)["item_id"].value_counts(sort=False)
    # Most interactions first; ties by smaller item id (deterministic).
    ranked = counts.reset_index().sort_values(["count", "item_id"], ascending=[False, True])["item_id"].to_numpy()
    top = np.full(k, -1, dtype=np.int64)
    top[: min(k, len(ranked))] = ranked[:k]
    recommended = np.broadcast_to(top, (len(requests), k))
    metrics = ranking_metrics(recommended, requests["target"].to_numpy(np.int64), k)
    return {f"popularity_{key}": v for key, v in metrics.items() if key != "num_users"}


def load_model(checkpoint: str | None = None, quantized: str | None = None, device="cpu"):
    """(model, table, source description) from a checkpoint folder or a quantized folder."""
    from onerec.quant.export import (  # heavy: safetensors, torch
        is_quantized_folder,
        load_model_folder,
        recipe_name,
    )

    if (checkpoint is None) == (quantized is None):
        raise UserError("give exactly one of --checkpoint or --quantized")
    folder = checkpoint or quantized
    if quantized is not None and not is_quantized_folder(quantized):
        raise UserError(f"{quantized} is not a quantized folder (no recipe.json); use --checkpoint")
    model, table, recipe = load_model_folder(folder, device=device)
    if recipe is None:
        return model, table, {"checkpoint": str(folder)}
    return model, table, {"quantized": str(folder), "recipe": recipe_name(recipe)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint folder (config.json, model.safetensors, ...)")
    src.add_argument("--quantized", help="quantized folder (with recipe.json)")
    parser.add_argument("--data", required=True, help="data folder the requests come from")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--beam", type=int, default=64, help="beam size (at least k)")
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--max-users", type=int, default=None, help="evaluate a seeded sample of this many users")
    parser.add_argument("--positions", type=int, default=1,
                        help="test split: score each user's last N interactions (each from the items before it)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-users sample")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for tiny/small)")


def main(args: argparse.Namespace) -> dict:
    from onerec.data import held_out_requests, load_dataset  # heavy: pandas, torch

    if args.k < 1 or args.beam < 1 or args.batch_size < 1 or args.positions < 1:
        raise UserError("--k, --beam, --batch-size and --positions must be positive")
    if args.positions > 1 and args.split != "test":
        raise UserError("--positions applies to the test split (the validation split has one target per user)")
    dataset = load_dataset(args.data)  # first: a missing data folder fails before any model load
    device = resolve_device(args.device)
    model, table, source = load_model(args.checkpoint, args.quantized, device)
    if device.type == "cpu":
        import torch  # heavy: torch

        from onerec.train import default_threads  # heavy: pandas

        torch.set_num_threads(args.threads or default_threads(model.cfg))
    requests = held_out_requests(dataset, args.split, model.cfg.context_len, args.positions, args.max_users,
                                 args.seed, source=str(args.data))
    metrics = evaluate(model, table, requests, k=args.k, beam_size=args.beam, batch_size=args.batch_size,
                       device=device, progress=True)
    metrics.update(num_users=int(requests["user_id"].nunique()), num_positions=len(requests))
    metrics.update(popularity_baseline(dataset, requests, args.k, args.positions))
    if model.cfg.categorical_features:  # unseen values took the unknown bucket: say how many
        from onerec.features import count_unseen  # heavy: pandas

        metrics["unseen_profile_values"] = count_unseen(requests, model.cfg.categorical_features)
    base = metrics[f"popularity_recall@{args.k}"]
    metrics["recall_vs_popularity"] = metrics[f"recall@{args.k}"] / base if base > 0 else None
    return {**source, "data": str(args.data), "split": args.split, "k": args.k, "beam": max(args.beam, args.k),
            "positions": args.positions, **metrics}
