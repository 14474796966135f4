"""The quality gate's statistics: paired bootstrap intervals and the non-inferiority decision.

Both models score the same users, so the comparison is paired: per user a metric value of the
reference (bf16) and of the candidate (FP8). Most users get the same value from both; only the
users where the two differ move the difference, which makes a paired interval far narrower than
two independent ones would be. The relative change of the mean, mean(new) / mean(ref) - 1, gets
a percentile bootstrap interval: users are resampled with replacement (seeded, so a verdict is
reproducible) and the ratio recomputed per resample.

Non-inferiority with a margin m (a relative drop the business tolerates):
    passed        the interval's lower bound is above -m (a drop worse than m is ruled out);
    failed        the upper bound is below -m (a drop worse than m is shown);
    inconclusive  otherwise: the sample cannot tell. `users_needed` estimates how many users
                  would decide it, assuming the observed change and per-user variance (the
                  interval's half-width shrinks as 1 / sqrt(users)).
A candidate identical to the reference has a zero-width interval at 0 and always passes.
"""

from __future__ import annotations

import math

import numpy as np

PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"
BOOTSTRAP_RESAMPLES = 2000
_CELLS_PER_CHUNK = 1 << 22  # resample weights held at once (groups x resamples)


def paired_relative_change(ref: np.ndarray, new: np.ndarray, confidence: float = 0.95,
                           resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """{estimate, low, high, confidence, num_users, discordant_users} of mean(new) / mean(ref) - 1.

    `ref`/`new`: one value per user, the same users in the same order. When the reference mean
    is 0 the relative change is undefined: estimate/low/high are None.
    """
    ref, new = np.asarray(ref, np.float64), np.asarray(new, np.float64)
    if ref.shape != new.shape or ref.ndim != 1:
        raise ValueError(f"paired values need two equal 1-D arrays, got {ref.shape} and {new.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(ref)
    result = {"confidence": confidence, "num_users": n, "discordant_users": int((ref != new).sum()),
              "estimate": None, "low": None, "high": None}
    if n > 0 and result["discordant_users"] == 0:
        return result | {"estimate": 0.0, "low": 0.0, "high": 0.0}
    if n == 0 or ref.sum() <= 0:
        return result
    estimate = new.sum() / ref.sum() - 1.0
    # Users with the same (ref, new) pair are interchangeable: resampling users is resampling these
    # groups in proportion to their size (exactly; hits and NDCG gains take few distinct values).
    pairs, counts = np.unique(np.stack([ref, new], 1), axis=0, return_counts=True)
    rng = np.random.default_rng(seed)
    ratios = []
    chunk = max(1, _CELLS_PER_CHUNK // len(pairs))
    for start in range(0, resamples, chunk):
        # Multinomial counts = how often each group is drawn in a resample of n users.
        weights = rng.multinomial(n, counts / n, size=min(chunk, resamples - start)).astype(np.float64)
        ref_sum = weights @ pairs[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.where(ref_sum > 0, weights @ pairs[:, 1] / ref_sum - 1.0, np.nan))
    ratios = np.concatenate(ratios)
    alpha = (1 - confidence) / 2
    low, high = np.nanquantile(ratios, [alpha, 1 - alpha])
    return result | {"estimate": float(estimate), "low": float(low), "high": float(high)}


def non_inferiority(interval: dict, margin: float) -> str:
    """passed / failed / inconclusive of a relative-change interval against a margin (module doc)."""
    low, high = interval["low"], interval["high"]
    if interval.get("discordant_users") == 0:
        return PASSED  # the same value for every user: nothing to be inferior by, whatever the margin
    if low is None:
        return INCONCLUSIVE
    if low > -margin:
        return PASSED
    if high < -margin:
        return FAILED
    return INCONCLUSIVE


def users_needed(interval: dict, margin: float) -> int | None:
    """Users that would decide an inconclusive comparison at the observed change and variance.

    None when undefined (no interval) or when the observed change sits exactly on the margin
    (no sample size decides it).
    """
    if interval["low"] is None:
        return None
    half_width = (interval["high"] - interval["low"]) / 2
    distance = abs(interval["estimate"] + margin)
    if distance == 0:
        return None
    if half_width <= distance:
        return int(interval["num_users"])
    return int(math.ceil(interval["num_users"] * (half_width / distance) ** 2))


def combine(verdicts: list[str]) -> str:
    """One verdict from several: any failed fails, else any inconclusive is inconclusive."""
    if FAILED in verdicts:
        return FAILED
    return INCONCLUSIVE if INCONCLUSIVE in verdicts else PASSED
