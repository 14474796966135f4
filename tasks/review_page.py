"""The reviewer's page: the model version description registration writes, from the run's Gates.

The approver decides on the version's page in the MLflow UI; the description puts there what
they must read first: the quality verdict, each judged metric's interval and verdict in %, its
figures, whether latency was measured (and its
ratios), the recipe, the layers kept in bf16, where the reports are, and the one approval step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from onerec.gate_verdict import GateVerdict
from tasks.gates import Gates


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


def quality_interval_lines(quality: GateVerdict) -> list[str]:
    """One line per judged metric: verdict, relative change and interval in %, margin, users x positions."""
    lines = []
    for i in quality.intervals:
        if i.estimate is None:
            change = "change n/a"
        else:
            change = (f"{100 * i.estimate:+.2f}% [{100 * i.low:+.2f}%, {100 * i.high:+.2f}%] "
                      f"({100 * (i.confidence or 0.95):g}% interval)")
        lines.append(f"  - {i.metric}: {i.verdict.upper()}, {change}, margin "
                     f"{'n/a' if i.margin is None else f'-{100 * i.margin:g}%'}, on {_fmt(i.num_users)} "
                     f"users x {_fmt(quality.positions)} positions")
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


# the quality figures the page shows (the run's metrics hold every figure)
QUALITY_FIGURES = re.compile(r"^(bf16_|fp8_|relative_|top\d+_overlap$|kl_max$|users_needed$|worst_layer_sqnr_db$)")


def version_description(cfg, gates: Gates, quantized_dir: str | Path, experiment_id: str, run_id: str,
                        tracking_uri: str | None) -> str:
    quality, latency = gates.quality, gates.latency
    figures = {k: v for k, v in quality.figures.items() if QUALITY_FIGURES.match(k)}
    lines = [
        f"**Gates: {gates.label}** (recipe `{cfg.recipe}`)",
        "",
        f"- Quality: {quality.outcome.upper()} on {_fmt(quality.figures.get('num_users'))} users: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(figures.items())),
        *quality_interval_lines(quality),
    ]
    if not latency.measured:
        lines.append(f"- Latency: NOT MEASURED ({latency.reason or 'no FP8 GPU'}); "
                     f"latency_gate_blocking={cfg.latency_gate_blocking}")
    else:
        lines.append(f"- Latency: {latency.outcome.upper()}: FP8/bf16 p50 "
                     f"{_fmt(latency.figures.get('latency_ratio'))}, throughput "
                     f"{_fmt(latency.figures.get('throughput_ratio'))} on {latency.device or '?'}")
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
