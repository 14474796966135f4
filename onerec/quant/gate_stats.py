"""The quality gate's statistics: paired cluster-bootstrap intervals and the non-inferiority decision.

Both models score the same held-out positions, so the comparison is paired: per position a
metric value of the reference (bf16) and of the candidate (FP8). Most positions get the same
value from both; only those where the two differ move the difference, which makes a paired
interval far narrower than two independent ones would be. A user contributes several positions
(their last N interactions), and those are not independent (one user's taste, overlapping
histories), so the bootstrap resamples users, each with all of their positions (a cluster
bootstrap): the relative change of the total, sum(new) / sum(ref) - 1, gets a percentile
interval over resamples of users (seeded, so a verdict is reproducible).

Non-inferiority with a margin m (a relative drop the business tolerates):
    passed        the interval's lower bound is above -m (a drop worse than m is ruled out);
    failed        the upper bound is below -m (a drop worse than m is shown);
    inconclusive  otherwise: the sample cannot tell. `users_needed` estimates how many users
                  would decide it, assuming the observed change and per-user variance (the
                  interval's half-width shrinks as 1 / sqrt(users)); `positions_needed` how
                  many positions per user would, given how strongly one user's positions are
                  correlated (the design effect; more positions cannot beat that correlation,
                  then only more users help).
A candidate identical to the reference has a zero-width interval at 0 and always passes.

Power (`power`): the half-width of an interval says the smallest change the data can tell from
zero. Measured on a comparison whose disagreement is the expected kind (the gate uses bf16 vs
fp32, before FP8 runs), it says up front which FP8 changes the data will decide at the margin.
"""

from __future__ import annotations

import math

import numpy as np

PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"
BOOTSTRAP_RESAMPLES = 2000
_CELLS_PER_CHUNK = 1 << 22  # resample weights held at once (groups x resamples)


def paired_relative_change(ref: np.ndarray, new: np.ndarray, confidence: float = 0.95,
                           resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, users: np.ndarray | None = None) -> dict:
    """{estimate, low, high, confidence, num_users, num_positions, discordant_users,
    discordant_positions, design_effect} of sum(new) / sum(ref) - 1.

    `ref`/`new`: one value per position, the same positions in the same order; `users`: the user
    of each position (None: every position its own user). When the reference sum is 0 the
    relative change is undefined: estimate/low/high are None. `design_effect`: the variance of the
    change with users resampled over its variance were positions independent (1: no correlation
    within a user; None when there is no disagreement to measure it on).
    """
    ref, new = np.asarray(ref, np.float64), np.asarray(new, np.float64)
    if ref.shape != new.shape or ref.ndim != 1:
        raise ValueError(f"paired values need two equal 1-D arrays, got {ref.shape} and {new.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if users is not None and np.shape(users) != ref.shape:
        raise ValueError(f"users needs one entry per position, got {np.shape(users)} for {ref.shape}")
    num_positions, discordant_positions = len(ref), int((ref != new).sum())
    position_ref, position_new = ref, new
    if users is not None:  # per user: the sums over their positions (the resampled unit)
        _, inverse = np.unique(np.asarray(users), return_inverse=True)
        ref, new = np.bincount(inverse, ref), np.bincount(inverse, new)
    n = len(ref)
    result = {"confidence": confidence, "num_users": n, "num_positions": num_positions,
              "discordant_users": int((ref != new).sum()), "discordant_positions": discordant_positions,
              "design_effect": None, "estimate": None, "low": None, "high": None}
    if n > 0 and result["discordant_users"] == 0:
        return result | {"estimate": 0.0, "low": 0.0, "high": 0.0}
    if n == 0 or ref.sum() <= 0:
        return result
    estimate = new.sum() / ref.sum() - 1.0
    # Linearised ratio: residuals new - (1 + estimate) * ref, summed per user vs per position.
    per_position = ((position_new - (1 + estimate) * position_ref) ** 2).sum()
    if per_position > 0:
        result["design_effect"] = float(((new - (1 + estimate) * ref) ** 2).sum() / per_position)
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


def positions_needed(interval: dict, margin: float, positions: int) -> int | None:
    """Positions per user that would decide an inconclusive comparison at the same users.

    The variance per user of N positions scales as (1 + (N - 1) rho) / N, rho the correlation of
    one user's positions (from the design effect measured at `positions`); None when undefined
    or when no number of positions reaches the needed width (only more users can).
    """
    if interval["low"] is None or positions < 1:
        return None
    distance = abs(interval["estimate"] + margin)
    half_width = (interval["high"] - interval["low"]) / 2
    if distance == 0:
        return None
    if half_width <= distance:
        return positions
    deff = interval.get("design_effect") or 1.0
    rho = min(max((deff - 1) / (positions - 1), 0.0), 1.0) if positions > 1 else 0.0
    target = (distance / half_width) ** 2 * (1 + (positions - 1) * rho) / positions  # needed variance factor
    if target <= rho:
        return None
    return int(math.ceil((1 - rho) / (target - rho)))


def scale_to_users(interval: dict, num_users: int) -> dict:
    """The interval the same comparison would give on `num_users` users: same estimate, half-width
    scaled by sqrt(measured users / num_users) (the bootstrap resamples users, so the spread of a
    mean over users shrinks as 1/sqrt(users)). Unchanged when undefined or already that size."""
    measured = interval["num_users"]
    if interval["low"] is None or not measured or measured == num_users:
        return interval
    half_width = (interval["high"] - interval["low"]) / 2 * math.sqrt(measured / num_users)
    scaled = {"estimate": interval["estimate"], "low": interval["estimate"] - half_width,
              "high": interval["estimate"] + half_width, "num_users": num_users, "measured_users": measured}
    if interval.get("num_positions"):  # the same positions per user as the sample
        scaled["num_positions"] = round(interval["num_positions"] * num_users / measured)
    return interval | scaled


def power(interval: dict, margin: float, positions: int = 1) -> dict:
    """What a comparison of this size can decide, from an interval of a comparison like it.

    `min_detectable_change`: the interval's half-width (a change smaller than that is not told
    from zero); `passes_above` / `fails_below`: the true relative changes that would come out
    passed / failed at `margin` with an interval that wide; `decides_at_margin`: whether a change
    of zero passes, and when not, the users (or positions per user, of `positions` now) with which
    it would. None where the interval is undefined or has no disagreement to scale from.
    """
    result = {"margin": margin, "num_users": interval["num_users"], "num_positions": interval.get("num_positions"),
              "discordant_positions": interval.get("discordant_positions"), "min_detectable_change": None,
              "passes_above": None, "fails_below": None, "decides_at_margin": None, "users_needed": None,
              "positions_needed": None, "measured_users": interval.get("measured_users", interval["num_users"])}
    if interval["low"] is None or interval.get("discordant_users") == 0:
        return result
    half_width = (interval["high"] - interval["low"]) / 2
    result |= {"min_detectable_change": half_width, "passes_above": half_width - margin,
               "fails_below": -margin - half_width, "decides_at_margin": half_width < margin}
    if half_width >= margin:  # even no change would be inconclusive: what would decide it
        at_zero = interval | {"estimate": 0.0, "low": -half_width, "high": half_width}
        result |= {"users_needed": users_needed(at_zero, margin),
                   "positions_needed": positions_needed(at_zero, margin, positions)}
    return result


def combine(verdicts: list[str]) -> str:
    """One verdict from several: any failed fails, else any inconclusive is inconclusive."""
    if FAILED in verdicts:
        return FAILED
    return INCONCLUSIVE if INCONCLUSIVE in verdicts else PASSED
