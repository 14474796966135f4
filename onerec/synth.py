"""`onerec-fp8 data synth`: a synthetic interaction data set with the structure real logs have.

What a recommender can learn from it, and what a most-popular baseline cannot:
- item popularity follows a power law (Zipf), so popularity is a real but weak baseline;
- every item belongs to one latent topic; every user has a few interests (topics with weights)
  that drift: now and then one interest is swapped for another, so recent history matters more;
- item-to-item transitions: each item has a few successors (mostly of its own topic) that often
  come next, so the last items of a history predict the next one;
- user profile columns (users.parquet) are noisy functions of the user's interests, and item
  columns (items.parquet) of the item's topic: both carry signal.

Writes interactions.parquet (user_id, item_id, timestamp), users.parquet (user_id + numeric
profile columns) and items.parquet (item_id, category, price): the data-folder format of
onerec/data.py. Deterministic given the seed. The default size trains the `tiny` preset on two
CPU cores in a few minutes; --users/--items/--interactions-per-user scale it up.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from onerec.errors import UserError
from onerec.manifest import atomic_folder

log = logging.getLogger(__name__)


@dataclass
class SynthConfig:
    users: int = 2000
    items: int = 1000
    interactions_per_user: int = 40  # mean; per-user counts are log-normal around it
    topics: int = 20
    zipf_exponent: float = 1.0  # item popularity ~ 1 / rank^a
    successors: int = 3  # item-to-item transitions per item
    p_transition: float = 0.5  # chance that the next item is a successor of the last one
    p_drift: float = 0.03  # chance per interaction that one interest is replaced
    seed: int = 0


def _choice(rng: np.random.Generator, p: np.ndarray) -> int:
    """One draw from probabilities p (cumsum + searchsorted: far cheaper than rng.choice per call)."""
    return int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"), len(p) - 1))


def generate(cfg: SynthConfig):
    """The three tables as pandas DataFrames: (interactions, users, items)."""
    import pandas as pd  # heavy: pandas

    rng = np.random.default_rng(cfg.seed)
    n_items, n_users, n_topics = cfg.items, cfg.users, cfg.topics
    if min(n_items, n_users, n_topics, cfg.interactions_per_user) < 1:
        raise ValueError("users, items, topics and interactions_per_user must be positive")

    # Items: topic, power-law popularity (ranks shuffled over items), successors.
    item_topic = rng.integers(0, n_topics, n_items)
    popularity = 1.0 / (1.0 + rng.permutation(n_items)) ** cfg.zipf_exponent
    topic_items = [np.flatnonzero(item_topic == t) for t in range(n_topics)]
    topic_items = [ti if len(ti) else rng.integers(0, n_items, 1) for ti in topic_items]
    topic_pop = [popularity[ti] / popularity[ti].sum() for ti in topic_items]
    successors = np.empty((n_items, cfg.successors), dtype=np.int64)
    for i in range(n_items):
        for s in range(cfg.successors):
            if rng.random() < 0.8:  # mostly within the topic, by popularity
                t = item_topic[i]
                successors[i, s] = topic_items[t][_choice(rng, topic_pop[t])]
            else:
                successors[i, s] = rng.integers(0, n_items)
    successor_p = 0.5 ** np.arange(cfg.successors)
    successor_p /= successor_p.sum()

    # Users: a few weighted interests; profile signals derived from them.
    topic_profile = rng.normal(size=(n_topics, 3))
    lengths = np.clip(
        np.round(rng.lognormal(np.log(cfg.interactions_per_user), 0.5, n_users)), 5, 4 * cfg.interactions_per_user
    ).astype(np.int64)
    start_time = 1_700_000_000 + rng.integers(0, 180 * 86400, n_users)

    users_rows, item_col, user_col, time_col = [], [], [], []
    for u in range(n_users):
        k = int(min(1 + rng.poisson(1.0), 4, n_topics))
        interests = rng.choice(n_topics, k, replace=False)
        weights = rng.dirichlet(np.ones(k))
        z = weights @ topic_profile[interests] + rng.normal(scale=0.4, size=3)
        seen: set[int] = set()
        last = -1
        t = int(start_time[u])
        for _ in range(lengths[u]):
            if rng.random() < cfg.p_drift:  # interest drift: one interest moves to another topic
                interests[rng.integers(k)] = rng.integers(n_topics)
            item = -1
            for _attempt in range(10):  # avoid repeats, as in most catalogues (MovieLens)
                if last >= 0 and rng.random() < cfg.p_transition:
                    item = int(successors[last, _choice(rng, successor_p)])
                else:
                    topic = interests[_choice(rng, weights)]
                    item = int(topic_items[topic][_choice(rng, topic_pop[topic])])
                if item not in seen:
                    break
            seen.add(item)
            last = item
            t += 1 + int(rng.exponential(3600.0))
            user_col.append(u)
            item_col.append(item)
            time_col.append(t)
        users_rows.append((
            u,
            float(np.clip(38 + 12 * z[0], 16, 80)),  # age
            float(np.exp(3.8 + 0.4 * z[1])),  # income_k
            float(1 / (1 + np.exp(-2 * z[2]))),  # night_share
            float(np.log1p(lengths[u]) + rng.normal(scale=0.2)),  # activity
        ))

    interactions = pd.DataFrame({
        "user_id": np.asarray(user_col, dtype=np.int64),
        "item_id": np.asarray(item_col, dtype=np.int64),
        "timestamp": np.asarray(time_col, dtype=np.int64),
    })
    users = pd.DataFrame(users_rows, columns=["user_id", "age", "income_k", "night_share", "activity"])
    users = users.astype({"user_id": np.int64, "age": np.float32, "income_k": np.float32,
                          "night_share": np.float32, "activity": np.float32})
    noisy_category = np.where(rng.random(n_items) < 0.9, item_topic, rng.integers(0, n_topics, n_items))
    items = pd.DataFrame({
        "item_id": np.arange(n_items, dtype=np.int64),
        "category": noisy_category.astype(np.int64),
        "price": np.exp(2.0 + 0.5 * topic_profile[item_topic, 0] + rng.normal(scale=0.3, size=n_items)).astype(np.float32),
    })
    return interactions, users, items


def synthesize(out_dir: str | Path, seed: int = 0, overwrite: bool = False, **size) -> dict:
    """Write a synthetic data folder; `size` overrides SynthConfig fields (users, items, ...)."""
    unknown = set(size) - set(SynthConfig.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown synth options {sorted(unknown)}")
    cfg = SynthConfig(seed=seed, **size)
    out = Path(out_dir)
    if out.is_dir() and not any(out.iterdir()):
        overwrite = True  # an empty folder (e.g. a test's tmp_path) is fine to fill
    try:
        interactions, users, items = generate(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    with atomic_folder(out, overwrite=overwrite) as tmp:
        interactions.to_parquet(tmp / "interactions.parquet", index=False)
        users.to_parquet(tmp / "users.parquet", index=False)
        items.to_parquet(tmp / "items.parquet", index=False)
    result = {
        "out": str(out),
        "users": int(interactions["user_id"].nunique()),
        "items": int(interactions["item_id"].nunique()),
        "interactions": len(interactions),
        "config": asdict(cfg),
    }
    log.info("wrote %s interactions of %s users over %s items to %s",
             result["interactions"], result["users"], result["items"], out)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", required=True, help="data folder to write (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=d.users)
    parser.add_argument("--items", type=int, default=d.items)
    parser.add_argument("--interactions-per-user", type=int, default=d.interactions_per_user,
                        help="mean interactions per user")
    parser.add_argument("--topics", type=int, default=d.topics, help="latent interest topics")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def main(args: argparse.Namespace) -> dict:
    return synthesize(
        args.out, seed=args.seed, overwrite=args.overwrite, users=args.users, items=args.items,
        interactions_per_user=args.interactions_per_user, topics=args.topics,
    )
