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


def positions_hits(users: int, positions: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position hits of `users` users x `positions` positions, each user with their own hit rate
    (Beta around `rate`: some users are easy to predict, some are not); and each position's user."""
    rng = np.random.default_rng(seed)
    user_rate = rng.beta(2 * rate / (1 - rate), 2, users)
    hits = (rng.random((users, positions)) < user_rate[:, None]).astype(np.float64)
    return hits.ravel(), np.repeat(np.arange(users), positions)


def flip(ref: np.ndarray, lose: float, gain: float, seed: int) -> np.ndarray:
    """`ref` with each hit lost with probability `lose` and each miss gained with probability `gain`."""
    u = np.random.default_rng(seed).random(len(ref))
    return np.where(ref > 0, (u >= lose).astype(np.float64), (u < gain).astype(np.float64))


# MovieLens-100K as the gate saw it: 943 users, bf16 recall@10 0.143, FP8 disagreeing on ~1.3% of
# users; losses and gains set for a true relative change of -0.7% (FP8 changes recall by < 1%).
ML_USERS, ML_RECALL = 943, 0.143
ML_LOSE, ML_GAIN = 0.0478, 0.00683


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_position_per_user_cannot_decide_a_movielens_sized_set_and_the_default_positions_do(seed):
    from onerec.quant.quality_gate import QualityGateConfig

    ref, _ = positions_hits(ML_USERS, 1, ML_RECALL, seed)
    one = paired_relative_change(ref, flip(ref, ML_LOSE, ML_GAIN, seed + 10))
    assert non_inferiority(one, MARGIN) == INCONCLUSIVE and one["high"] - one["low"] > 0.06
    positions = QualityGateConfig().positions
    ref, users = positions_hits(ML_USERS, positions, ML_RECALL, seed)
    many = paired_relative_change(ref, flip(ref, ML_LOSE, ML_GAIN, seed + 10), users=users)
    assert (many["num_users"], many["num_positions"]) == (ML_USERS, ML_USERS * positions)
    assert non_inferiority(many, MARGIN) == PASSED, many
    assert many["low"] > -0.04  # room to spare: an FP8 change of -1% passes too


def test_positions_needed_decides_what_one_position_could_not():
    ref, _ = positions_hits(ML_USERS, 1, ML_RECALL, 0)
    one = paired_relative_change(ref, flip(ref, ML_LOSE, ML_GAIN, 10))
    assert non_inferiority(one, MARGIN) == INCONCLUSIVE
    needed = gate_stats.positions_needed(one, MARGIN, positions=1)
    assert needed is not None and 1 < needed <= 10
    ref, users = positions_hits(ML_USERS, needed, ML_RECALL, 7)
    assert non_inferiority(paired_relative_change(ref, flip(ref, ML_LOSE, ML_GAIN, 8), users=users), MARGIN) == PASSED


def test_the_bootstrap_resamples_users_not_positions():
    # Each user's 10 positions are copies of one value: ten times the positions, no more information.
    ref = hits(300, seed=11)
    new = lose(ref, 0.1, seed=12)
    users = np.repeat(np.arange(300), 10)
    clustered = paired_relative_change(np.repeat(ref, 10), np.repeat(new, 10), users=users)
    per_user = paired_relative_change(ref, new)
    naive = paired_relative_change(np.repeat(ref, 10), np.repeat(new, 10))  # positions as if independent
    width = lambda i: i["high"] - i["low"]  # noqa: E731
    assert clustered["estimate"] == pytest.approx(per_user["estimate"])
    assert width(clustered) == pytest.approx(width(per_user), rel=0.15)
    assert width(naive) < 0.5 * width(clustered)  # what resampling positions would have claimed
    assert clustered["design_effect"] == pytest.approx(10.0)
    # 10 copies cannot narrow anything: more positions would not decide it, only users
    assert gate_stats.positions_needed(clustered, 0.12, positions=10) is None
    with pytest.raises(ValueError, match="one entry per position"):
        paired_relative_change(ref, new, users=users)


def test_identical_positions_never_fail_and_power_says_what_the_data_can_decide():
    ref, users = positions_hits(500, 10, 0.3, 21)
    same = paired_relative_change(ref, ref.copy(), users=users)
    assert non_inferiority(same, 0.0) == PASSED and (same["low"], same["high"]) == (0.0, 0.0)
    assert gate_stats.power(same, MARGIN)["min_detectable_change"] is None  # no disagreement to scale from
    floor = paired_relative_change(ref, flip(ref, 0.01, 0.004, 22), users=users)
    power = gate_stats.power(floor, MARGIN)
    half = (floor["high"] - floor["low"]) / 2
    assert power["min_detectable_change"] == pytest.approx(half) and power["decides_at_margin"] is True
    assert power["passes_above"] == pytest.approx(half - MARGIN) and power["fails_below"] == pytest.approx(-MARGIN - half)
    assert power["users_needed"] is None  # it decides: nothing more needed
    # one position per user on a MovieLens-sized set: up front, it says it cannot decide, and what would
    ref, _ = positions_hits(ML_USERS, 1, ML_RECALL, 0)
    noisy = flip(ref, 2 * ML_LOSE, 2 * ML_LOSE * ML_RECALL / (1 - ML_RECALL), 10)  # ~2.7% of users disagree
    weak = gate_stats.power(paired_relative_change(ref, noisy), MARGIN, positions=1)
    assert weak["decides_at_margin"] is False and weak["users_needed"] > ML_USERS and 1 < weak["positions_needed"] <= 10


def test_scale_to_users_narrows_the_interval_as_one_over_sqrt_users():
    from onerec.quant.gate_stats import scale_to_users

    measured = {"estimate": -0.01, "low": -0.05, "high": 0.03, "num_users": 1000, "num_positions": 10000}
    scaled = scale_to_users(measured, 4000)
    assert scaled["estimate"] == -0.01 and scaled["num_users"] == 4000 and scaled["measured_users"] == 1000
    assert (scaled["high"] - scaled["low"]) / 2 == pytest.approx(0.04 / 2)
    assert scaled["num_positions"] == 40000
    assert scale_to_users(measured, 1000) is measured
    assert scale_to_users({**measured, "low": None, "high": None}, 4000)["num_users"] == 1000
