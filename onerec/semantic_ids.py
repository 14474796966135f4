"""Semantic IDs: the tokenizer that maps items to code triples, and its prefix index.

The table is `semantic_ids.npy`, int32 [num_items, n_levels]: row i holds the codes of item id
i. Item ids are non-negative integers; ids that never occurred in training (gaps in the id
range) have the row [-1, -1, -1]: unknown to the model, dropped from histories, never generated.
Every known item has a unique code triple, so a beam that ends on a valid triple names exactly
one item.

`SemanticIdIndex` is the prefix trie as flat tensors, used by beam search to keep only valid
prefixes: level l lists the distinct prefixes of length l+1 in sorted order, and for every
prefix of length l the contiguous range of its children.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onerec.errors import UserError

log = logging.getLogger(__name__)

UNKNOWN = -1


def load_table(path: str | Path) -> np.ndarray:
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # a pickled (object) array, or not a .npy at all
        raise UserError(f"{path}: not a plain .npy integer table ({str(exc).splitlines()[0]})") from None
    validate_table(table, source=str(path))
    return table


def validate_table(table: np.ndarray, codebook_size: int | None = None, source: str = "table") -> None:
    if table.ndim != 2 or table.dtype.kind != "i":
        raise UserError(f"{source}: semantic-id table must be a 2-D integer array, got {table.dtype} {table.shape}")
    known = table[(table >= 0).all(1)]
    if ((table < 0).any(1) & ~(table < 0).all(1)).any():
        raise UserError(f"{source}: a row is partly unknown (-1 must fill a whole row)")
    if codebook_size is not None and known.size and known.max() >= codebook_size:
        raise UserError(f"{source}: code {int(known.max())} >= codebook size {codebook_size}")
    if len(np.unique(known, axis=0)) != len(known):
        raise UserError(f"{source}: two items share a code triple; semantic ids must be unique")


@dataclass
class SemanticIdIndex:
    """Prefix trie of the valid code triples, as tensors (see module doc)."""

    codebook_size: int
    # per level l: codes of the distinct prefixes of length l+1 (sorted), [n_prefixes_l]
    codes: list[torch.Tensor]
    # per level l: for each prefix of length l (one, the empty prefix, at l = 0) its children range
    child_start: list[torch.Tensor]
    child_count: list[torch.Tensor]
    max_children: list[int]
    leaf_item: torch.Tensor  # item id of each full-length prefix (leaf), [n_items_known]

    @classmethod
    def build(cls, table: np.ndarray, codebook_size: int) -> SemanticIdIndex:
        validate_table(table, codebook_size)
        item_ids = np.flatnonzero((table >= 0).all(1))
        if not len(item_ids):
            raise UserError("semantic-id table has no known item")
        triples = table[item_ids].astype(np.int64)
        order = np.lexsort(triples.T[::-1])
        triples, item_ids = triples[order], item_ids[order]
        n_levels = triples.shape[1]
        codes, starts, counts, max_children = [], [], [], []
        parent_of = np.zeros(len(triples), dtype=np.int64)  # index of each item's length-l prefix
        n_parents = 1
        for level in range(n_levels):
            key = parent_of * codebook_size + triples[:, level]
            uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
            parents = uniq // codebook_size
            count = np.bincount(parents, minlength=n_parents)
            start = np.concatenate([[0], np.cumsum(count)[:-1]])
            codes.append(torch.from_numpy(triples[first, level].copy()))
            starts.append(torch.from_numpy(start))
            counts.append(torch.from_numpy(count))
            max_children.append(int(count.max()))
            parent_of, n_parents = inverse.reshape(-1), len(uniq)
        return cls(codebook_size, codes, starts, counts, max_children, torch.from_numpy(item_ids[np.argsort(parent_of)]))

    def to(self, device) -> SemanticIdIndex:
        def move(ts):
            return [t.to(device) for t in ts]

        return SemanticIdIndex(
            self.codebook_size, move(self.codes), move(self.child_start), move(self.child_count),
            self.max_children, self.leaf_item.to(device),
        )

    def children(self, level: int, parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For parent prefix ids [...]: child prefix ids [..., M], their codes [..., M], valid mask."""
        m = self.max_children[level]
        start = self.child_start[level][parent]
        count = self.child_count[level][parent]
        offset = torch.arange(m, device=parent.device)
        valid = offset < count[..., None]
        child = torch.where(valid, start[..., None] + offset, 0)
        return child, self.codes[level][child], valid


def encode_history(history, table: np.ndarray, context_len: int) -> tuple[np.ndarray, int]:
    """One item-id history (newest last) -> its kept codes [n, n_levels] and the number of unknown ids.

    Unknown ids (outside the table or with an unknown row) are dropped and counted; of what
    remains the newest `context_len` items are kept.
    """
    ids = np.asarray(history, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(table))
    known = np.zeros(len(ids), dtype=bool)
    known[inside] = (table[ids[inside]] >= 0).all(1)
    kept = ids[known]
    kept = kept[max(0, len(kept) - context_len):]
    return table[kept].astype(np.int64), int((~known).sum())


def pad_histories(codes: list[np.ndarray], n_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept codes per user -> codes [B, T, n_levels] left-padded and mask [B, T]; T is the longest (at least 1)."""
    T = max(1, max((len(c) for c in codes), default=0))
    sids = np.zeros((len(codes), T, n_levels), dtype=np.int64)
    mask = np.zeros((len(codes), T), dtype=bool)
    for i, c in enumerate(codes):
        if len(c):
            sids[i, T - len(c):] = c
            mask[i, T - len(c):] = True
    return torch.from_numpy(sids), torch.from_numpy(mask)


def encode_histories(
    histories: list[list[int]], table: np.ndarray, context_len: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Item-id histories (newest last) -> codes [B, T, n_levels] left-padded, mask [B, T], unknowns per user
    (`encode_history` per user, then `pad_histories`)."""
    encoded = [encode_history(h, table, context_len) for h in histories]
    sids, mask = pad_histories([c for c, _ in encoded], table.shape[1])
    return sids, mask, [u for _, u in encoded]


# ---------------------------------------------------------------------------------------------
# Building the table: item embeddings -> residual k-means -> unique code triples
# ---------------------------------------------------------------------------------------------


def cooccurrence_embeddings(
    users: np.ndarray, items: np.ndarray, n_rows: int, dim: int = 32, window: int = 5,
    max_contexts: int = 2048, seed: int = 0,
) -> np.ndarray:
    """PPMI-SVD item embeddings [n_rows, dim] from co-occurrence within `window` steps of one user.

    `users`/`items` are the interactions in (user, time) order with items already mapped to
    rows 0..n_rows-1. Contexts are the `max_contexts` most frequent items (keeps the matrix
    dense and small); pairs are weighted 1/distance. Rows are L2-normalised (cosine geometry);
    an item that never co-occurs gets a zero row.
    """
    counts = np.bincount(items, minlength=n_rows)
    # Fewer contexts for big catalogues: the dense matrix stays around 5e7 cells (~400 MB).
    max_contexts = min(max_contexts, max(256, int(5e7 // max(n_rows, 1))))
    contexts = np.argsort(-counts, kind="stable")[: min(max_contexts, n_rows)]
    column = np.full(n_rows, -1, dtype=np.int64)
    column[contexts] = np.arange(len(contexts))
    n_cols = len(contexts)
    cooc = np.zeros((n_rows, n_cols), dtype=np.float64)
    for offset in range(1, window + 1):
        same_user = users[:-offset] == users[offset:]
        a, b = items[:-offset][same_user], items[offset:][same_user]
        for row, ctx in ((a, b), (b, a)):
            col = column[ctx]
            ok = col >= 0
            np.add.at(cooc, (row[ok], col[ok]), 1.0 / offset)
    total = cooc.sum()
    if total == 0:
        return np.zeros((n_rows, dim))
    row_p = cooc.sum(1, keepdims=True) / total
    col_w = cooc.sum(0) ** 0.75  # context-distribution smoothing (word2vec / Levy et al.)
    col_p = col_w / col_w.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(cooc / total) - np.log(row_p) - np.log(col_p)[None, :]
    ppmi = np.where(cooc > 0, np.maximum(pmi, 0.0), 0.0)
    emb = _randomized_svd_embedding(ppmi, dim, seed)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.divide(emb, norm, out=np.zeros_like(emb), where=norm > 0)


def _randomized_svd_embedding(a: np.ndarray, dim: int, seed: int, power_iters: int = 3) -> np.ndarray:
    """U_k * sqrt(S_k) of a (Halko et al.), deterministic given the seed; zero-padded to `dim` columns."""
    k = min(dim, *a.shape)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(a @ rng.standard_normal((a.shape[1], min(k + 10, a.shape[1]))))
    for _ in range(power_iters):
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    u_small, s, _ = np.linalg.svd(q.T @ a, full_matrices=False)
    u = (q @ u_small)[:, :k]
    u *= np.where(u.sum(0) < 0, -1.0, 1.0)  # fix the sign of each component: deterministic output
    emb = np.zeros((a.shape[0], dim))
    emb[:, :k] = u * np.sqrt(s[:k])
    return emb


def feature_embeddings(items_table, item_ids: np.ndarray) -> np.ndarray | None:
    """Item feature rows for `item_ids`: one-hot for categorical columns, z-scores for numeric ones.

    L2-normalised per row; None when there is no usable feature column. Items missing from the
    table get zero rows.
    """
    import pandas as pd  # heavy: pandas

    if items_table is None or "item_id" not in items_table.columns:
        return None
    table = items_table.drop_duplicates("item_id").set_index("item_id").reindex(item_ids)
    blocks = []
    for col in table.columns:
        values = table[col]
        if pd.api.types.is_float_dtype(values):
            std = values.std()
            if std and np.isfinite(std):
                blocks.append(((values - values.mean()) / std).fillna(0.0).to_numpy()[:, None])
        elif values.nunique() <= 256:  # integer / string codes with few values: a category
            blocks.append(pd.get_dummies(values, dtype=np.float64).to_numpy())
        else:  # free text, ids: no feature the codes could use
            log.info("items: column %r ignored (%d distinct non-float values > 256)", col, values.nunique())
    if not blocks:
        return None
    feats = np.concatenate(blocks, axis=1).astype(np.float64)
    norm = np.linalg.norm(feats, axis=1, keepdims=True)
    return np.divide(feats, norm, out=np.zeros_like(feats), where=norm > 0)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means: centroids [min(k, n), d] and assignments [n]. Deterministic given the rng."""
    n = len(x)
    k = min(k, n)
    centroids = x[np.sort(rng.choice(n, k, replace=False))].copy()
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        dist = _sq_distances(x, centroids)
        new_assign = dist.argmin(1)
        counts = np.bincount(new_assign, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, new_assign, x)
        empty = np.flatnonzero(counts == 0)
        centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
        if len(empty):  # re-seed empty clusters with the points worst served now
            worst = np.argsort(-dist[np.arange(n), new_assign], kind="stable")[: len(empty)]
            centroids[empty[: len(worst)]] = x[worst]
        if np.array_equal(new_assign, assign) and not len(empty):
            break
        assign = new_assign
    return centroids, _sq_distances(x, centroids).argmin(1)


def _sq_distances(x: np.ndarray, c: np.ndarray, chunk: int = 2048) -> np.ndarray:
    out = np.empty((len(x), len(c)))
    c_sq = (c**2).sum(1)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        out[s : s + chunk] = (xs**2).sum(1, keepdims=True) - 2 * xs @ c.T + c_sq
    return np.maximum(out, 0.0)


def residual_kmeans(
    x: np.ndarray, codebook_size: int, n_levels: int = 3, seed: int = 0, iters: int = 25,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Codes [n, n_levels] and per-level centroids: level l clusters what levels < l left unexplained."""
    rng = np.random.default_rng(seed)
    residual = x.astype(np.float64)
    codes = np.zeros((len(x), n_levels), dtype=np.int64)
    centroids = []
    for level in range(n_levels):
        c, assign = kmeans(residual, codebook_size, rng, iters)
        codes[:, level] = assign
        centroids.append(c)
        residual = residual - c[assign]
    return codes, centroids


def make_unique(codes: np.ndarray, x: np.ndarray, centroids: list[np.ndarray], codebook_size: int) -> np.ndarray:
    """Give every item a distinct code triple; items that collide move to the nearest free code.

    Items are visited from the best quantized (smallest final residual) to the worst, so the
    item closest to a triple keeps it. A later item whose triple is taken keeps its prefix and
    takes the nearest free code at the last level (nearest to its residual there); if that
    prefix is full it moves one level up, and so on. Codes without a centroid (a level had fewer
    points than codes) are used last, in increasing order.
    """
    n, n_levels = codes.shape
    residuals = [x.astype(np.float64)]
    for level in range(n_levels):
        residuals.append(residuals[-1] - centroids[level][codes[:, level]])
    error = (residuals[-1] ** 2).sum(1)
    order = np.lexsort((np.arange(n), error))
    out = codes.copy()
    taken: set[tuple[int, ...]] = set()
    full: set[tuple[int, ...]] = set()  # prefixes with no free triple below them

    def ranked(level: int, residual: np.ndarray) -> np.ndarray:
        c = centroids[level]
        near = np.argsort(((c - residual) ** 2).sum(1), kind="stable")
        return np.concatenate([near, np.arange(len(c), codebook_size)])

    def place(prefix: tuple[int, ...], level: int, residual: np.ndarray) -> tuple[int, ...] | None:
        if prefix in full:
            return None
        for code in ranked(level, residual):
            code = int(code)
            cand = (*prefix, code)
            if level == n_levels - 1:
                if cand not in taken:
                    return cand
            else:
                sub = residual - centroids[level][code] if code < len(centroids[level]) else residual
                found = place(cand, level + 1, sub)
                if found is not None:
                    return found
        full.add(prefix)
        return None

    for i in order:
        triple = tuple(int(c) for c in codes[i])
        if triple in taken:
            # Move up from the last level until a prefix with room is found.
            for keep in range(n_levels - 1, -1, -1):
                found = place(triple[:keep], keep, residuals[keep][i])
                if found is not None:
                    triple = found
                    break
            else:
                raise ValueError(f"more items than {codebook_size}^{n_levels} code triples")
        taken.add(triple)
        out[i] = triple
    return out


def build_semantic_ids(
    interactions, codebook_size: int, seed: int = 0, n_levels: int = 3, dim: int = 32, window: int = 5,
    feature_weight: float = 0.5, num_items: int | None = None, items_table=None,
) -> np.ndarray:
    """The semantic-id table, int32 [num_items, n_levels], from training interactions.

    `interactions` is a DataFrame (user_id, item_id, timestamp): a dataset's training part only
    (`onerec.data.training_interactions`: the leave-last-out split's validation and test targets
    never shape the tokenizer); `items_table` its items (features), if any. Item embeddings are PPMI-SVD of
    co-occurrence within user sequences, concatenated with item features (weighted by
    `feature_weight`) where an items table is given; residual k-means gives n_levels codes per
    item; collisions are resolved by `make_unique`. Item ids absent from the training data get
    -1 rows. `num_items` (default: the largest id seen + 1, in the items table too) sets the
    table length.
    """
    interactions = interactions.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    users = interactions["user_id"].to_numpy(np.int64)
    item_ids = interactions["item_id"].to_numpy(np.int64)
    known = np.unique(item_ids)
    if not len(known):
        raise UserError("no training interactions to build semantic ids from")
    size = int(known.max()) + 1
    if items_table is not None and "item_id" in items_table.columns and len(items_table):
        size = max(size, int(items_table["item_id"].max()) + 1)
    if num_items is not None:
        if num_items < int(known.max()) + 1:
            raise UserError(f"num_items {num_items} is smaller than the largest item id + 1")
        size = num_items
    rows = np.searchsorted(known, item_ids)
    emb = cooccurrence_embeddings(users, rows, len(known), dim=dim, window=window, seed=seed)
    feats = feature_embeddings(items_table, known) if feature_weight > 0 else None
    if feats is not None:
        emb = np.concatenate([emb, feature_weight * feats], axis=1)
    codes, centroids = residual_kmeans(emb, codebook_size, n_levels, seed=seed)
    codes = make_unique(codes, emb, centroids, codebook_size)
    table = np.full((size, n_levels), UNKNOWN, dtype=np.int32)
    table[known] = codes
    validate_table(table, codebook_size)
    return table
