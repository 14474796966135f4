"""The live evidence of a canary, kept by the local serving proxy while a canary runs.

While a canary serves a share of the traffic (ops/rollout/proxy.py, PUT /_proxy/canary), every
recommendation request is counted on the arm that answered it (`stable`: the champion, `canary`:
the candidate): requests, errors (5xx or upstream unreachable), users answered and those answered
with no item at all (empty results: the notion the server counts as onerec_empty_results_total
beside onerec_recommended_users_total, which the chart's AnalysisTemplate judges), and the latency
the proxy measured. Requests the champion answered are also mirrored to the
canary (its answer is discarded) and the two answers compared per user: top-k overlap (shared
items / k) and score shift (|top-1 score difference|). tasks/canary.py judges these against the
configured thresholds at the end of each step; the proxy resets them when the step changes.

No torch import (the proxy starts in well under a second).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque

RECOMMEND_PATHS = ("/v1/recommend",)  # plus /v2/models/<name>/infer (is_recommendation)
LATENCY_WINDOW = 20_000  # the newest latencies kept per arm (p99 over them)


def is_recommendation(method: str, path: str) -> bool:
    return method == "POST" and (path in RECOMMEND_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer")))


def recommendations(body: bytes) -> list[tuple[list[int], list[float]]] | None:
    """Per user (items, scores) of a /v1/recommend or an Open Inference answer; None if it is neither."""
    try:
        answer = json.loads(body)
        if "users" in answer:
            return [(list(u["items"]), list(u["scores"])) for u in answer["users"]]
        tensors = {t["name"]: t for t in answer["outputs"]}
        items, scores = tensors["items"], tensors["scores"]
        rows, k = items["shape"]
        out = []
        for i in range(rows):
            row_items, row_scores = items["data"][i * k:(i + 1) * k], scores["data"][i * k:(i + 1) * k]
            valid = [j for j, item in enumerate(row_items) if item >= 0]
            out.append(([row_items[j] for j in valid], [row_scores[j] for j in valid]))
        return out
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def p99(values) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class ArmStats:
    def __init__(self):
        self.requests = self.errors = self.users = self.empty = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def observe(self, status: int | None, seconds: float, body: bytes | None) -> None:
        """One answered request: `status` None when the upstream was unreachable."""
        self.requests += 1
        self.latencies.append(seconds)
        if status is None or status >= 500:
            self.errors += 1
        elif status == 200 and body is not None:
            users = recommendations(body)
            if users is not None:
                self.users += len(users)
                self.empty += sum(1 for items, _ in users if not items)

    def summary(self) -> dict:
        n = self.requests
        return {"requests": n, "errors": self.errors, "error_rate": self.errors / n if n else None,
                "users": self.users, "empty": self.empty, "empty_rate": self.empty / self.users if self.users else None,
                "p99_s": p99(self.latencies)}


class MirrorStats:
    def __init__(self):
        self.compared = self.failed = self.dropped = 0
        self.overlaps: list[float] = []
        self.shifts: list[float] = []

    def compare(self, stable: bytes, canary: bytes | None) -> None:
        """The champion's answer against the canary's to the same request (None: the canary failed)."""
        ours, theirs = recommendations(stable), None if canary is None else recommendations(canary)
        if ours is None:
            return  # the champion's answer was no recommendation (an error): nothing to compare
        if theirs is None or len(theirs) != len(ours):
            self.failed += 1
            return
        self.compared += 1
        for (items, scores), (c_items, c_scores) in zip(ours, theirs, strict=True):
            k = max(len(items), len(c_items))
            if k:
                self.overlaps.append(len(set(items) & set(c_items)) / k)
            if scores and c_scores:
                self.shifts.append(abs(scores[0] - c_scores[0]))

    def summary(self) -> dict:
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        return {"compared": self.compared, "failed": self.failed, "dropped": self.dropped,
                "users": len(self.overlaps), "overlap_mean": mean(self.overlaps),
                "overlap_min": min(self.overlaps) if self.overlaps else None,
                "score_shift_mean": mean(self.shifts), "score_shift_max": max(self.shifts) if self.shifts else None}


class CanaryStats:
    """Both arms and the mirror comparison since the step began."""

    def __init__(self):
        self.arms = {"stable": ArmStats(), "canary": ArmStats()}
        self.mirror = MirrorStats()

    def summary(self) -> dict:
        return {**{arm: stats.summary() for arm, stats in self.arms.items()}, "mirror": self.mirror.summary()}


@dataclasses.dataclass(frozen=True)
class CanaryConfig:
    """The canary's steps and the thresholds its analysis holds each step to (tasks/canary.py).

    Each step sends `weights[i]` percent of the recommendation requests to the candidate and lasts
    at least `hold_s` and until the candidate answered `min_requests` requests (and, below 100%,
    `min_mirrored` mirrored requests were compared); a step that has not seen that much traffic
    after `step_timeout_s` is inconclusive, which rolls back like a failure. No weights: no canary
    (the rollout switches all traffic at once once the new version is ready).
    """

    weights: tuple[int, ...] = ()  # e.g. (5, 25, 100); each in 1..100, increasing
    hold_s: float = 300.0
    min_requests: int = 200
    min_mirrored: int = 50
    step_timeout_s: float = 3600.0
    poll_s: float = 1.0
    # helm target with the chart's canary (values canary.enabled): how long promote waits for the
    # Argo Rollout's verdict after `helm upgrade` (all its steps and pauses must fit in it)
    rollout_timeout_s: float = 7200.0
    # live metrics, candidate against the champion of the same step (at 100%: of the step before)
    max_error_rate_increase: float = 0.01  # candidate error rate minus the champion's
    max_p99_ratio: float = 1.5  # candidate p99 / champion p99 ...
    min_p99_increase_s: float = 0.05  # ... counted only when the candidate is also this much slower
    max_empty_rate_increase: float = 0.01  # share of users answered with no item (empty results)
    # mirrored requests, the candidate's answers against the champion's
    min_topk_overlap: float = 0.5  # mean share of the champion's top-k the candidate also returns
    max_score_shift: float = 1.0  # mean |top-1 score difference| (summed log-probabilities)

    def __post_init__(self) -> None:
        w = list(self.weights)
        if w and not (all(isinstance(x, int) and 1 <= x <= 100 for x in w) and w == sorted(set(w))):
            raise ValueError(f"canary weights must be increasing percentages in 1..100, not {w}")
        if self.hold_s < 0 or self.step_timeout_s < self.hold_s or self.poll_s <= 0 or self.rollout_timeout_s <= 0:
            raise ValueError("canary: need 0 <= hold_s <= step_timeout_s, poll_s > 0 and rollout_timeout_s > 0")
        if self.min_requests < 1 or self.min_mirrored < 0:
            raise ValueError("canary: min_requests must be >= 1 and min_mirrored >= 0")
