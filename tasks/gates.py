"""What registration decides on: the two gates' verdicts and the calibration data's validation.

`Gates` is written once by the register step (reports/gates.json, the bytes the provenance signs)
and read back by promote and rollback (tasks.provenance.verify_version); the review page and the
run's metrics come from it. The policy lives here, once:

    passed        the quality gate passed, and the latency gate passed, or could not measure and
                  latency_gate_blocking is false (the CPU demo: label passed-latency-unmeasured)
    inconclusive  the quality gate's sample cannot decide
    failed        a gate said no
    unmeasured    the latency gate could not measure and blocks (production: no evidence, no candidate)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from onerec.errors import UserError
from onerec.gate_verdict import INCONCLUSIVE, GateVerdict, figures


@dataclass(frozen=True)
class Validation:
    """The calibration data's validation, as registration records it."""

    passed: bool | None
    rows: int | None = None
    drift: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Gates:
    quality: GateVerdict
    latency: GateVerdict
    validation: Validation

    # --- the policy ---------------------------------------------------------------------------------

    def passed(self, latency_gate_blocking: bool) -> bool:
        if not self.quality.passed:
            return False
        if not self.latency.measured:
            return not latency_gate_blocking
        return self.latency.passed

    def outcome(self, latency_gate_blocking: bool) -> tuple[str, str]:
        """(passed | failed | inconclusive | unmeasured, why)."""
        if self.passed(latency_gate_blocking):
            return "passed", "gates passed"
        if self.quality.outcome == INCONCLUSIVE:
            return "inconclusive", f"quality gate inconclusive: {self.quality.reason or 'the sample cannot decide'}"
        if not self.quality.passed:
            return "failed", "quality gate failed" + (f": {self.quality.reason}" if self.quality.reason else "")
        if not self.latency.measured:
            return "unmeasured", f"latency gate could not measure ({self.latency.reason or 'unknown'}) and blocks"
        return "failed", "latency gate failed"

    @property
    def label(self) -> str:
        """The `gates` tag of a version that passed: `passed`, or `passed-latency-unmeasured`."""
        return "passed" if self.latency.measured else "passed-latency-unmeasured"

    def metrics(self) -> dict[str, float]:
        """The run's metrics: every figure of each gate and of the validation, {"quality.top10_overlap": 0.97}."""
        values = {f"quality.{k}": v for k, v in self.quality.figures.items()}
        values |= {f"latency.{k}": v for k, v in self.latency.figures.items()}
        values |= {f"validation.{k}": v for k, v in figures(self.validation.__dict__).items()}
        # MLflow allows alphanumerics, _ - . space : / in metric names
        return {re.sub(r"[^0-9A-Za-z_\-. :/]", "_", k.replace("@", "_at_")): v for k, v in values.items()}

    # --- JSON (reports/gates.json) ------------------------------------------------------------------

    def to_json(self) -> bytes:
        data = {"quality": self.quality.to_dict(), "latency": self.latency.to_dict(),
                "validation": self.validation.__dict__}
        return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Gates:
        try:
            value = json.loads(data)
            return cls(quality=GateVerdict.from_dict(value["quality"]), latency=GateVerdict.from_dict(value["latency"]),
                       validation=Validation(**value["validation"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"gates.json: not a gate record ({type(exc).__name__}: {exc})") from None
