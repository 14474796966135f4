"""Synthetic data, the leave-last-out split and the semantic-id builder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from onerec.data import load_dataset, split_leave_last_out, training_interactions
from onerec.errors import UserError
from onerec.semantic_ids import SemanticIdIndex, build_semantic_ids, make_unique, residual_kmeans
from onerec.synth import synthesize

SIZE = dict(users=150, items=120, interactions_per_user=20, topics=6)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, seed=5, **SIZE)
    return out


def test_synth_is_deterministic_and_structured(small_data, tmp_path):
    synthesize(tmp_path / "again", seed=5, **SIZE)
    synthesize(tmp_path / "other", seed=6, **SIZE)
    for name in ("interactions", "users", "items"):
        a = pd.read_parquet(small_data / f"{name}.parquet")
        pd.testing.assert_frame_equal(a, pd.read_parquet(tmp_path / "again" / f"{name}.parquet"))
    a = pd.read_parquet(small_data / "interactions.parquet")
    assert not a.equals(pd.read_parquet(tmp_path / "other" / "interactions.parquet"))
    ds = load_dataset(small_data)
    assert ds.profile_features == ["age", "income_k", "night_share", "activity"]
    assert ds.interactions["user_id"].nunique() == SIZE["users"]
    assert ds.interactions.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()
    # Skewed (power-law) popularity: the top 10% of items take at least twice their uniform share.
    counts = ds.interactions["item_id"].value_counts().to_numpy()
    assert counts[: len(counts) // 10].sum() > 0.2 * counts.sum()
    assert counts[0] >= 3 * np.median(counts)
    with pytest.raises(Exception, match="already exists"):
        synthesize(small_data, seed=5, **SIZE)


def test_training_interactions_agree_with_the_split(small_data):
    ds = load_dataset(small_data)
    split = split_leave_last_out(ds)
    train = training_interactions(ds)
    # Every training interaction is a history item or training target; no valid/test target is.
    assert len(train) == len(ds.interactions) - len(split.valid) - len(split.test)
    last_two = ds.interactions.groupby("user_id").tail(2)
    assert set(zip(last_two.user_id, last_two.timestamp, strict=True)).isdisjoint(
        zip(train.user_id, train.timestamp, strict=True))
    assert split.test["history"].map(len).min() >= 2
    assert (split.test["history"].map(lambda h: h[-1]).to_numpy() == split.valid["target"].to_numpy()).all()
    for frame in (split.train, split.valid, split.test):
        assert list(frame.columns[:3]) == ["user_id", "history", "target"]
        assert frame[ds.profile_features].dtypes.eq(np.float32).all()


def test_held_out_positions_are_each_users_last_interactions_and_never_trained_on(small_data):
    from onerec.data import held_out_requests

    ds = load_dataset(small_data)
    one, five = split_leave_last_out(ds), split_leave_last_out(ds, positions=5)
    by_user = ds.interactions.groupby("user_id")["item_id"].apply(list)
    for user, frame in five.test.groupby("user_id"):
        items = by_user[user]
        n = min(5, len(items) - 2)  # every held-out user keeps a validation target with a history
        assert frame["target"].tolist() == items[-n:]
        assert [h[-1] for h in frame["history"]] == items[-n - 1:-1]  # each from the items before it
    assert five.test.groupby("user_id").size().max() == 5
    assert five.test["user_id"].nunique() == len(one.test) and five.valid["user_id"].tolist() == one.valid["user_id"].tolist()
    # no position the test part scores is a training target; the training interactions drop them
    keys = lambda f: set(zip(f["user_id"], f["history"].map(len), strict=True))  # noqa: E731
    assert keys(five.test).isdisjoint(keys(five.train)) and keys(five.valid).isdisjoint(keys(five.train))
    assert len(five.train) + len(five.valid) + len(five.test) == len(one.train) + len(one.valid) + len(one.test)
    train = training_interactions(ds, positions=5)
    assert len(train) == len(ds.interactions) - len(five.valid) - len(five.test)
    sample = held_out_requests(ds, "test", positions=5, max_users=20, seed=3)
    assert sample["user_id"].nunique() == 20 and sample.groupby("user_id").size().max() == 5
    assert sample.equals(held_out_requests(ds, "test", positions=5, max_users=20, seed=3))
    with pytest.raises(UserError, match="positions"):
        split_leave_last_out(ds, positions=0)


def test_semantic_ids_unique_deterministic_and_unknown_rows(small_data):
    ds = load_dataset(small_data)
    table = build_semantic_ids(training_interactions(ds), codebook_size=8, seed=0, items_table=ds.items)
    assert table.dtype == np.int32 and table.shape == (SIZE["items"], 3)
    known = (table >= 0).all(1)
    train_items = set(training_interactions(ds)["item_id"])
    assert set(np.flatnonzero(known)) == train_items
    assert (table[~known] == -1).all()
    assert len(np.unique(table[known], axis=0)) == known.sum()
    assert table.max() < 8
    assert np.array_equal(table, build_semantic_ids(training_interactions(ds), codebook_size=8, seed=0,
                                                    items_table=ds.items))
    index = SemanticIdIndex.build(table, 8)
    assert sorted(index.leaf_item.tolist()) == sorted(train_items)
    # Without the items table, and a longer table.
    longer = build_semantic_ids(training_interactions(ds), codebook_size=8, seed=0, num_items=200)
    assert longer.shape == (200, 3) and (longer[SIZE["items"]:] == -1).all()


def test_level_one_codes_group_similar_items(small_data):
    """Items sharing a first code should mostly share a synthetic topic (items.parquet category)."""
    ds = load_dataset(small_data)
    table = build_semantic_ids(training_interactions(ds), codebook_size=8, seed=0, feature_weight=0.0)  # co-occurrence only
    category = ds.items.set_index("item_id")["category"].reindex(range(len(table))).to_numpy()
    known = (table >= 0).all(1)
    frame = pd.DataFrame({"code": table[known, 0], "category": category[known]})
    purity = frame.groupby("code")["category"].agg(lambda s: s.value_counts().iloc[0] / len(s))
    sizes = frame.groupby("code").size()
    weighted = float((purity * sizes).sum() / sizes.sum())
    chance = frame["category"].value_counts(normalize=True).iloc[0]
    assert weighted > 2 * chance


def test_collisions_move_to_the_nearest_free_code():
    x = np.zeros((5, 2))  # five identical items: one triple, four collisions
    x[4] = [5.0, 5.0]
    codes, centroids = residual_kmeans(x, codebook_size=2, n_levels=3, seed=0)
    unique = make_unique(codes, x, centroids, codebook_size=2)
    assert len({tuple(r) for r in unique}) == 5
    assert np.array_equal(unique, make_unique(codes, x, centroids, codebook_size=2))
    # The far-away item is alone in its first-level cluster and keeps its original triple.
    assert tuple(unique[4]) == tuple(codes[4])
    with pytest.raises(ValueError, match="more items than"):
        make_unique(np.zeros((9, 3), dtype=np.int64), np.zeros((9, 1)), [np.zeros((1, 1))] * 3, codebook_size=2)


def test_bad_data_folders_are_user_errors(tmp_path):
    from onerec.data import read_requests
    from onerec.errors import UserError

    (tmp_path / "a").mkdir()
    pd.DataFrame({"user_id": [1, 1], "item_id": [2, 3]}).to_csv(tmp_path / "a" / "interactions.csv", index=False)
    with pytest.raises(UserError, match="missing columns"):
        load_dataset(tmp_path / "a")
    pd.DataFrame({"user_id": [1, 1], "item_id": [2, 3], "timestamp": [1, 2]}).to_csv(
        tmp_path / "a" / "interactions.csv", index=False)
    pd.DataFrame({"user_id": [1, 1], "age": [3.0, 4.0]}).to_csv(tmp_path / "a" / "users.csv", index=False)
    with pytest.raises(UserError, match="unique"):
        load_dataset(tmp_path / "a")
    # Request tables round-trip through CSV too (lists stored as text).
    requests = pd.DataFrame({"user_id": [1], "history": [[4, 5]], "target": [6]})
    requests.to_csv(tmp_path / "r.csv", index=False)
    assert read_requests(tmp_path / "r.csv")["history"].tolist() == [[4, 5]]
