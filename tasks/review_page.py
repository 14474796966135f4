"""The reviewer's page: the model version description registration writes, and the `gates` label.

The approver decides on the version's page in the MLflow UI; the description puts there what
they must read first: the quality verdict, each judged metric's interval and verdict in %, its
figures, whether latency was measured (and its
ratios), the recipe, the layers kept in bf16, where the reports are, and the one approval step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def gates_label(gates: dict) -> str:
    """`passed`, or `passed-latency-unmeasured` when the latency gate could not measure (no FP8 GPU)."""
    return "passed-latency-unmeasured" if gates.get("latency", {}).get("measurable") is False else "passed"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def kept_in_bf16(quantized_dir: str | Path) -> list[str]:
    """The layers the recipe left in bf16 (recipe.json `excluded`), with the reason when recorded."""
    path = Path(quantized_dir) / "recipe.json"
    if not path.is_file():
        return []
    excluded = json.loads(path.read_text()).get("excluded") or {}
    if isinstance(excluded, dict):
        return [f"{name} ({why})" if why else name for name, why in sorted(excluded.items())]
    return [str(item) for item in excluded]


def quality_interval_lines(quality: dict) -> list[str]:
    """One line per judged metric: verdict, relative change and interval in %, margin, users x positions."""
    lines = []
    for metric, verdict in sorted((quality.get("metric_verdicts") or {}).items()):
        interval = (quality.get("intervals") or {}).get(metric) or {}
        if interval.get("estimate") is None:
            change = "change n/a"
        else:
            change = (f"{100 * interval['estimate']:+.2f}% [{100 * interval['low']:+.2f}%, "
                      f"{100 * interval['high']:+.2f}%] ({100 * interval.get('confidence', 0.95):g}% interval)")
        margin = interval.get("margin")
        lines.append(f"  - {metric}: {verdict.upper()}, {change}, margin "
                     f"{'n/a' if margin is None else f'-{100 * margin:g}%'}, on {_fmt(interval.get('num_users'))} "
                     f"users x {_fmt(quality.get('positions'))} positions")
    return lines


# (label, path under the run's artifacts/reports/) of what the approver reads, most important first
REPORTS = (
    ("quality plot", "quality_gate.png"), ("quality figures", "quality_gate.json"),
    ("latency", "latency_gate.json"), ("layers (SQNR, kept in bf16)", "quantization/quantization.png"),
    ("calibration data checks", "validation/calibration_validation.png"),
    ("Great Expectations Data Docs", "validation/data_docs/index.html"), ("every gate figure", "gates.json"),
)


def markdown_text(text: str) -> str:
    """`text` shown as written in the UI's markdown (layer patterns such as `heads.*` are not emphasis)."""
    return re.sub(r"([\\`*_{}\[\]<>#|~])", r"\\\1", text)


def run_url(tracking_uri: str | None, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of a run (its reports are its artifacts), or `run ID` without a server."""
    return f"{tracking_uri}/#/experiments/{experiment_id}/runs/{run_id}" if tracking_uri else f"run {run_id}"


def version_description(cfg, gates: dict, quantized_dir: str | Path, experiment_id: str, run_id: str,
                        tracking_uri: str | None) -> str:
    quality, latency = gates.get("quality", {}), gates.get("latency", {})
    figures = {k: v for k, v in quality.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    lines = [
        f"**Gates: {gates_label(gates)}** (recipe `{cfg.recipe}`)",
        "",
        f"- Quality: {'PASSED' if quality.get('passed') else 'FAILED'} on {_fmt(quality.get('num_users'))} users: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(figures.items()) if k != "num_users"),
        *quality_interval_lines(quality),
    ]
    if latency.get("measurable") is False:
        lines.append(f"- Latency: NOT MEASURED ({latency.get('reason', 'no FP8 GPU')}); "
                     f"latency_gate_blocking={cfg.latency_gate_blocking}")
    else:
        lines.append(f"- Latency: {'PASSED' if latency.get('passed') else 'FAILED'}: FP8/bf16 p50 "
                     f"{_fmt(latency.get('latency_ratio'))}, throughput {_fmt(latency.get('throughput_ratio'))} "
                     f"on {latency.get('device', '?')}")
    kept = kept_in_bf16(quantized_dir)
    lines.append(f"- Layers kept in bf16: {', '.join(map(markdown_text, kept)) if kept else 'none'}")
    run_link = run_url(tracking_uri, experiment_id, run_id)
    reports = ", ".join(f"[{label}]({run_link}/artifacts/reports/{path})" if tracking_uri else f"{label} reports/{path}"
                        for label, path in REPORTS)
    lines += [
        f"- Reports (artifacts of the [registering run]({run_link})): {reports}" if tracking_uri
        else f"- Reports (artifacts of {run_link}): {reports}",
        "",
        "**To approve**: signed in as an approver, in this page's Tags table click the pencil on the row "
        "`approval`, replace `pending` by `approved` (or `rejected`) and click Save. Do NOT use the "
        "\"Promote model\" button: it copies the version to another model and approves nothing.",
    ]
    return "\n".join(lines)
