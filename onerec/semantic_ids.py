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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onerec.errors import UserError

UNKNOWN = -1


def load_table(path: str | Path) -> np.ndarray:
    table = np.load(path, allow_pickle=False)
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


def encode_histories(
    histories: list[list[int]], table: np.ndarray, context_len: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Item-id histories (newest last) -> codes [B, T, n_levels] left-padded, mask [B, T], unknowns per user.

    Unknown ids (outside the table or with an unknown row) are dropped and counted; of what
    remains the newest `context_len` items are kept. T is the longest kept history (at least 1).
    """
    n_levels = table.shape[1]
    kept, unknown = [], []
    for history in histories:
        ids = np.asarray(history, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(table))
        known = np.zeros(len(ids), dtype=bool)
        known[inside] = (table[ids[inside]] >= 0).all(1)
        unknown.append(int((~known).sum()))
        kept.append(ids[known][-context_len:])
    T = max(1, max((len(k) for k in kept), default=0))
    sids = np.zeros((len(histories), T, n_levels), dtype=np.int64)
    mask = np.zeros((len(histories), T), dtype=bool)
    for i, ids in enumerate(kept):
        if len(ids):
            sids[i, T - len(ids) :] = table[ids]
            mask[i, T - len(ids) :] = True
    return torch.from_numpy(sids), torch.from_numpy(mask), unknown
