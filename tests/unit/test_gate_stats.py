"""The quality gate's statistics on constructed per-user hit vectors, where the truth is known.

`lose(hits, share)` removes a known share of the reference's hits: the true relative change is
exactly -share, so the interval must cover it, and the verdict must follow the sample size.
"""

import numpy as np
import pytest

from onerec.quant import gate_stats
from onerec.quant.gate_stats import (
    FAILED,
    INCONCLUSIVE,
    PASSED,
    non_inferiority,
    paired_relative_change,
    users_needed,
)

MARGIN = 0.05


def hits(n: int, rate: float = 0.3, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < rate).astype(np.float64)


def lose(ref: np.ndarray, share: float, seed: int = 1) -> np.ndarray:
    """`ref` with exactly round(share * hits) of its hits turned into misses."""
    new = ref.copy()
    hit_users = np.flatnonzero(ref > 0)
    lost = np.random.default_rng(seed).choice(hit_users, int(round(share * len(hit_users))), replace=False)
    new[lost] = 0.0
    return new


@pytest.mark.parametrize("n", [5, 40, 3000])
def test_identical_results_never_fail_whatever_the_sample_or_margin(n):
    ref = hits(n, seed=n)
    interval = paired_relative_change(ref, ref.copy())
    assert (interval["estimate"], interval["low"], interval["high"], interval["discordant_users"]) == (0.0, 0.0, 0.0, 0)
    for margin in (0.0, 0.001, MARGIN):
        assert non_inferiority(interval, margin) == PASSED
    zeros = np.zeros(n)  # no hit at all on either side: identical too
    assert non_inferiority(paired_relative_change(zeros, zeros), MARGIN) == PASSED


def test_a_known_loss_fails_with_many_users_and_is_inconclusive_with_few():
    share = 0.10  # the true relative change is -10%, twice the margin
    big = hits(4000)
    interval = paired_relative_change(big, lose(big, share))
    assert interval["estimate"] == pytest.approx(-share, abs=1e-3)
    assert interval["low"] < -share < interval["high"]
    assert non_inferiority(interval, MARGIN) == FAILED  # the whole interval lies below -5%
    small = hits(60, seed=3)
    interval = paired_relative_change(small, lose(small, share))
    assert interval["low"] < -MARGIN < interval["high"]
    assert non_inferiority(interval, MARGIN) == INCONCLUSIVE
    needed = users_needed(interval, MARGIN)
    assert needed > 60
    # ... and that many users do decide it (the same loss on a sample of the estimated size)
    enough = hits(int(needed * 1.5), seed=4)
    assert non_inferiority(paired_relative_change(enough, lose(enough, share)), MARGIN) == FAILED


def test_a_small_loss_passes_once_the_sample_is_large_enough():
    share = 0.01  # well inside the margin
    ref = hits(4000, seed=5)
    interval = paired_relative_change(ref, lose(ref, share))
    assert interval["low"] > -MARGIN and non_inferiority(interval, MARGIN) == PASSED
    few = hits(50, seed=6)
    assert non_inferiority(paired_relative_change(few, lose(few, 0.2)), MARGIN) != PASSED


def test_the_interval_covers_the_true_change_about_as_often_as_it_claims():
    # Users drawn from a population whose true relative change is known: 10% of hits lost,
    # 2% of misses gained -> E[new] / E[ref] - 1 = (0.3 * 0.9 + 0.7 * 0.02) / 0.3 - 1.
    truth = (0.3 * 0.9 + 0.7 * 0.02) / 0.3 - 1
    covered = 0
    trials = 60
    for seed in range(trials):
        rng = np.random.default_rng(100 + seed)
        ref = (rng.random(400) < 0.3).astype(float)
        flip = rng.random(400)
        new = np.where(ref > 0, (flip >= 0.1).astype(float), (flip < 0.02).astype(float))
        interval = paired_relative_change(ref, new, resamples=400, seed=seed)
        covered += interval["low"] <= truth <= interval["high"]
    assert covered / trials >= 0.85  # nominal 95%; 60 trials leave room for chance


def test_seeded_and_validated():
    ref, new = hits(300), lose(hits(300), 0.1)
    assert paired_relative_change(ref, new, seed=3) == paired_relative_change(ref, new, seed=3)
    with pytest.raises(ValueError):
        paired_relative_change(ref, new[:10])
    with pytest.raises(ValueError):
        paired_relative_change(ref, new, confidence=1.0)
    assert gate_stats.combine([PASSED, INCONCLUSIVE]) == INCONCLUSIVE
    assert gate_stats.combine([INCONCLUSIVE, FAILED, PASSED]) == FAILED
    assert gate_stats.combine([PASSED, PASSED]) == PASSED


def test_gate_config_refuses_meaningless_settings():
    from onerec.errors import UserError
    from onerec.quant.quality_gate import QualityGateConfig

    for bad in ({"confidence": 1.0}, {"max_relative_recall_drop": -0.01}, {"bootstrap_resamples": 10}):
        with pytest.raises(UserError):
            QualityGateConfig(**bad)
    assert QualityGateConfig(max_relative_ndcg_drop=None).max_relative_ndcg_drop is None
