"""A gate's verdict: the one typed record a gate hands on (versioned JSON).

The quality gate (onerec.quant.quality_gate) and the latency gate (onerec.engine.latency_gate)
write a full report (every measurement, reports/<gate>.json, with its plot); `GateVerdict.of_report`
reads that report once, here, into what everything after the gate reads: registration (the
outcome, the run's metrics), provenance (the signed gates.json holds the verdicts), the review
page (figures, intervals, device) and the CLI (exit codes). Nothing else reads a gate report by
its keys.

    outcome   passed | failed | inconclusive (the quality gate's sample cannot decide)
              | unmeasured (the latency gate had no FP8 GPU to measure on)

`to_dict()` / `from_dict()` are the JSON form (an XCom, gates.json); `schema_version` changes when
a field changes meaning, and a record of another version is a one-line error, never a guess.
Stdlib only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from onerec.errors import UserError

SCHEMA_VERSION = 1
GATES = ("quality", "latency")
PASSED, FAILED, INCONCLUSIVE, UNMEASURED = "passed", "failed", "inconclusive", "unmeasured"
OUTCOMES = (PASSED, FAILED, INCONCLUSIVE, UNMEASURED)
# what `onerec-fp8` exits with after a gate: scripts tell a failed gate from an undecided one; a
# gate that could not measure here (no FP8 GPU) exits 0: the pipeline's policy decides what that means
EXIT_CODES = {PASSED: 0, FAILED: 3, INCONCLUSIVE: 4, UNMEASURED: 0}
# a report's settings, not measurements: left out of the figures
SETTINGS_KEYS = ("config", "thresholds", "confidence", "margin")


@dataclass(frozen=True)
class MetricInterval:
    """One judged quality metric: its verdict and the relative change FP8 vs bf16 with its interval."""

    metric: str
    verdict: str
    estimate: float | None = None
    low: float | None = None
    high: float | None = None
    confidence: float | None = None
    margin: float | None = None
    num_users: int | None = None


@dataclass(frozen=True)
class GateVerdict:
    gate: str  # quality | latency
    outcome: str  # one of OUTCOMES
    reason: str = ""
    # every number the gate measured, flattened with dots ("latency_ms.bf16.1.p50_ms"); settings left out
    figures: dict[str, float] = field(default_factory=dict)
    intervals: tuple[MetricInterval, ...] = ()  # the quality gate's judged metrics
    device: str | None = None  # where it measured
    positions: int | None = None  # the quality gate's scored positions per user
    duration_s: float | None = None
    config_sha256: str | None = None  # the configuration the gate ran with (tasks.config.config_sha256)
    report_json: str | None = None  # the full report this verdict was read from
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise UserError(f"gate verdict: gate must be one of {GATES}, not {self.gate!r}")
        if self.outcome not in OUTCOMES:
            raise UserError(f"{self.gate} gate verdict: outcome must be one of {OUTCOMES}, not {self.outcome!r}")

    @property
    def passed(self) -> bool:
        return self.outcome == PASSED

    @property
    def measured(self) -> bool:
        return self.outcome != UNMEASURED

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    def with_run(self, duration_s: float | None = None, config_sha256: str | None = None,
                 report_json: str | None = None) -> GateVerdict:
        """This verdict with what the step that ran the gate knows (its time, configuration, report file)."""
        return dataclasses.replace(self, duration_s=duration_s, config_sha256=config_sha256, report_json=report_json)

    # --- JSON -------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> GateVerdict:
        """A verdict from its JSON form; another schema version or a missing/unknown field is a UserError."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise UserError(f"gate verdict: expected a JSON object, not {type(value).__name__}")
        if value.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"gate verdict of schema version {value.get('schema_version')!r}; this code reads "
                            f"version {SCHEMA_VERSION} (re-run the gate)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise UserError(f"gate verdict: unknown field(s) {unknown}")
        try:
            intervals = tuple(MetricInterval(**i) for i in value.get("intervals", ()))
            return cls(**{**value, "intervals": intervals, "figures": dict(value.get("figures", {}))})
        except TypeError as exc:
            raise UserError(f"gate verdict: {exc}") from None

    # --- reading a gate's report (the only place that knows the reports' keys) ----------------------

    @classmethod
    def of_report(cls, report: dict) -> GateVerdict:
        """The verdict in a quality or latency gate's report (its `gate` key says which)."""
        gate = report.get("gate")
        if gate == "quality":
            return cls._of_quality(report)
        if gate == "latency":
            return cls._of_latency(report)
        raise UserError(f"not a gate report (gate {gate!r}; known: {GATES})")

    @classmethod
    def _of_quality(cls, report: dict) -> GateVerdict:
        intervals = report.get("intervals") or {}
        judged = tuple(
            MetricInterval(metric=metric, verdict=verdict, **{
                k: intervals.get(metric, {}).get(k)
                for k in ("estimate", "low", "high", "confidence", "margin", "num_users")})
            for metric, verdict in sorted((report.get("metric_verdicts") or {}).items()))
        return cls(gate="quality", outcome=report["verdict"], reason=report.get("reason", ""),
                   figures=figures(report), intervals=judged, device=(report.get("config") or {}).get("device"),
                   positions=report.get("positions"), duration_s=report.get("duration_s"))

    @classmethod
    def _of_latency(cls, report: dict) -> GateVerdict:
        if report.get("measurable") is False:
            return cls(gate="latency", outcome=UNMEASURED, reason=report.get("reason", "no FP8 GPU"),
                       figures=figures(report), device=report.get("device"), duration_s=report.get("duration_s"))
        passed = bool(report.get("passed"))
        reason = report.get("reason") or (
            f"FP8/bf16 p50 latency {report.get('latency_ratio')} at batch {report.get('latency_batch')}, "
            f"throughput {report.get('throughput_ratio')} at batch {report.get('throughput_batch')}")
        return cls(gate="latency", outcome=PASSED if passed else FAILED, reason=reason, figures=figures(report),
                   device=report.get("device"), duration_s=report.get("duration_s"))


def figures(report: dict) -> dict[str, float]:
    """Every finite number of `report` (booleans as 0/1), flattened with dots; settings left out."""
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, int | float) and math.isfinite(value):
            out[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if k not in SETTINGS_KEYS:
                    walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", report)
    return out
