"""The gate reports of a run: <report_dir>/<gate>.json, with its PNG beside (<gate>.png).

Written once per gate, by the gate's step; the registry logs the folder as the run's artifacts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def gate_report(result: dict, report_dir: str | Path, gate: str, plot: Callable | None = None) -> dict:
    """Write `result` as <report_dir>/<gate>.json (and <gate>.png with `plot(result, path)`); returns it."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        result["plot"] = str(plot(result, report_dir / f"{gate}.png"))
    result["report_json"] = str(report_dir / f"{gate}.json")
    (report_dir / f"{gate}.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    return result
