"""`onerec-fp8 gate quality`: FP8 vs bf16 on held-out users with the same beam search.

    onerec-fp8 gate quality --checkpoint CKPT --quantized QDIR --data DIR \
        [--thresholds FILE] [--auto --max-excluded N --out FIXED_QDIR]

Both models run in bf16 (the FP8 model's other layers are bf16 too) on the same held-out requests
(the test split of `--data`, leave-last-out, optionally a seeded sample of --max-users):
- recall@K and NDCG@K of both (onerec.evaluate) and their relative change;
- mean top-K overlap: |top-K(bf16) & top-K(FP8)| / K per user, averaged;
- KL(bf16 || FP8) of each semantic-ID level's softmax, teacher-forced on the true target;
- each FP8 layer's SQNR against its bf16 layer on the same inputs, and the worst one.

Passes when every threshold of `QualityGateConfig` holds (defaults: relative recall@10 drop <=
1%, top-10 overlap >= 0.90; NDCG, KL and SQNR limits are optional). `--auto` then keeps the most
sensitive layers (lowest SQNR first) in bf16, one at a time, until the gate passes or
--max-excluded layers are spent, and records which; with --out it writes the repaired folder.
Results: JSON on stdout (`passed` and every figure) and quality_gate.json/.png in --report-dir.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onerec.evaluate import topk_overlap

log = logging.getLogger(__name__)


@dataclass
class QualityGateConfig:
    # thresholds
    max_relative_recall_drop: float = 0.01  # (bf16 - fp8) / bf16 of recall@k
    min_topk_overlap: float = 0.90
    max_relative_ndcg_drop: float | None = None
    max_kl: float | None = None  # on the worst SID level, nats
    min_layer_sqnr_db: float | None = None
    # how the comparison runs
    k: int = 10
    beam_size: int = 64
    batch_size: int = 256
    split: str = "test"
    max_users: int | None = None
    seed: int = 0
    device: str = "cpu"  # cuda: the FP8 GEMMs run on the GPU's tensor cores

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> QualityGateConfig:
        from onerec.errors import UserError

        values = {}
        if path is not None:
            try:
                values = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise UserError(f"thresholds file {path}: cannot be read ({exc})") from None
            unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise UserError(f"thresholds file {path}: unknown keys {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _relative_change(fp8: float, bf16: float) -> float | None:
    return (fp8 - bf16) / bf16 if bf16 > 0 else None


def level_kl(bf16_model, fp8_model, calibration) -> list[float]:
    """Mean KL(bf16 || fp8) per SID level of the teacher-forced softmax, in nats."""
    import torch

    from onerec.quant.calibrate import run_model

    total, n = None, 0
    for batch in calibration.batches(bf16_model):
        p = torch.log_softmax(run_model(bf16_model, batch).float(), -1)
        q = torch.log_softmax(run_model(fp8_model, batch).float(), -1)
        kl = (p.exp() * (p - q)).sum(-1).sum(0).double()  # [n_levels]
        total = kl if total is None else total + kl
        n += p.shape[0]
    return [float(v) / n for v in total] if n else []


class QualityComparison:
    """bf16 reference results computed once; `compare(fp8_model)` runs the FP8 side and judges."""

    def __init__(self, bf16_model, table, requests, config: QualityGateConfig):
        from onerec.evaluate import ranking_metrics, recommend
        from onerec.quant.calibrate import Calibration

        self.bf16_model, self.table, self.requests, self.config = bf16_model, table, requests, config
        self.targets = requests["target"].to_numpy(np.int64)
        self.calibration = Calibration(requests, table, batch_size=min(config.batch_size, 128))
        self.bf16_items, _ = recommend(
            bf16_model, table, requests, config.k, config.beam_size, config.batch_size, config.device, progress=True
        )
        self.bf16_metrics = ranking_metrics(self.bf16_items, self.targets, config.k)

    def layer_sqnr(self, fp8_model) -> dict[str, float | None]:
        from onerec.quant.calibrate import measure_sqnr
        from onerec.quant.export import fp8_layers

        return measure_sqnr(self.bf16_model, fp8_layers(fp8_model), self.calibration, desc="layer sqnr")

    def compare(self, fp8_model, sqnr: dict[str, float | None] | None = None) -> dict:
        from onerec.evaluate import ranking_metrics, recommend

        c, k = self.config, self.config.k
        items, _ = recommend(fp8_model, self.table, self.requests, k, c.beam_size, c.batch_size, c.device, progress=True)
        fp8_metrics = ranking_metrics(items, self.targets, k)
        b, q = self.bf16_metrics, fp8_metrics
        recall_change = _relative_change(q[f"recall@{k}"], b[f"recall@{k}"])
        ndcg_change = _relative_change(q[f"ndcg@{k}"], b[f"ndcg@{k}"])
        overlap = topk_overlap(self.bf16_items, items, k)
        kl = level_kl(self.bf16_model, fp8_model, self.calibration)
        sqnr = self.layer_sqnr(fp8_model) if sqnr is None else sqnr
        measured = {n: v for n, v in sqnr.items() if v is not None}
        worst = min(measured.items(), key=lambda kv: kv[1]) if measured else (None, None)
        if recall_change is None:  # bf16 recall is 0: FP8 must not be worse, which it cannot be
            recall_ok = q[f"recall@{k}"] >= b[f"recall@{k}"]
        else:
            recall_ok = -recall_change <= c.max_relative_recall_drop
        checks = {
            "recall": recall_ok,
            "topk_overlap": overlap >= c.min_topk_overlap,
        }
        if c.max_relative_ndcg_drop is not None:
            checks["ndcg"] = ndcg_change is None or -ndcg_change <= c.max_relative_ndcg_drop
        if c.max_kl is not None:
            checks["kl"] = max(kl, default=0.0) <= c.max_kl
        if c.min_layer_sqnr_db is not None:
            checks["layer_sqnr"] = worst[1] is None or worst[1] >= c.min_layer_sqnr_db
        return {
            "passed": all(checks.values()),
            "checks": checks,
            "num_users": int(len(self.requests)),
            f"bf16_recall@{k}": b[f"recall@{k}"], f"fp8_recall@{k}": q[f"recall@{k}"],
            f"bf16_ndcg@{k}": b[f"ndcg@{k}"], f"fp8_ndcg@{k}": q[f"ndcg@{k}"],
            f"relative_recall@{k}_change": recall_change, f"relative_ndcg@{k}_change": ndcg_change,
            f"top{k}_overlap": overlap,
            "kl_per_level": kl, "kl_max": max(kl, default=None),
            "worst_layer": worst[0], "worst_layer_sqnr_db": worst[1],
            "layer_sqnr_db": sqnr,
        }


def _to_bf16_linear(bf16_model, name: str):
    return copy.deepcopy(bf16_model.get_submodule(name))


def run_quality_gate(
    checkpoint: str | Path, quantized: str | Path, data: str | Path, config: QualityGateConfig | None = None,
    auto: bool = False, max_excluded: int = 3, out: str | Path | None = None, report_dir: str | Path | None = None,
) -> dict:
    """The quality gate as a function (the pipeline step calls this); see the module doc."""
    import torch

    from onerec.checkpoint import load_checkpoint
    from onerec.data import load_dataset, split_leave_last_out
    from onerec.errors import UserError
    from onerec.quant.export import check_made_from, load_quantized
    from onerec.quant.recipes import _replace

    config = config or QualityGateConfig()
    if auto and max_excluded < 1:
        raise UserError("--max-excluded must be at least 1 with --auto")
    if out is not None and not auto:
        raise UserError("--out writes the folder that --auto repaired: give --auto too")
    dataset = load_dataset(data)
    bf16_model, table = load_checkpoint(checkpoint, device=config.device, dtype=torch.bfloat16)
    fp8_model, q_table, recipe = load_quantized(quantized, device=config.device)
    check_made_from(quantized, recipe, checkpoint, table, q_table)
    split = split_leave_last_out(dataset, max_history=bf16_model.cfg.context_len)
    if config.split not in ("test", "valid"):
        raise UserError(f"split must be test or valid, got {config.split!r}")
    requests = getattr(split, config.split)
    if requests.empty:
        raise UserError(f"{data}: no {config.split} requests (users need at least 3 interactions)")
    if config.max_users is not None and config.max_users < len(requests):
        requests = requests.sample(n=config.max_users, random_state=config.seed).reset_index(drop=True)

    comparison = QualityComparison(bf16_model, table, requests, config)
    sqnr = comparison.layer_sqnr(fp8_model)
    result = initial = comparison.compare(fp8_model, sqnr)
    log.info("quality gate: passed=%s recall change %s overlap %.3f", result["passed"],
             result[f"relative_recall@{config.k}_change"], result[f"top{config.k}_overlap"])
    summary = {
        "gate": "quality", "checkpoint": str(checkpoint), "quantized": str(quantized), "data": str(data),
        "recipe": recipe["recipe"]["name"], "config": dataclasses.asdict(config),
    }
    if auto:
        ranking = sorted((n for n, v in sqnr.items() if v is not None), key=lambda n: sqnr[n])
        kept, steps = [], []
        while not result["passed"] and len(kept) < min(max_excluded, len(ranking)):
            name = ranking[len(kept)]
            _replace(fp8_model, name, _to_bf16_linear(bf16_model, name))
            kept.append(name)
            remaining = {n: v for n, v in sqnr.items() if n not in kept}
            result = comparison.compare(fp8_model, remaining)
            steps.append({"kept_in_bf16": name, "layer_sqnr_db": sqnr[name], "passed": result["passed"],
                          f"relative_recall@{config.k}_change": result[f"relative_recall@{config.k}_change"],
                          f"top{config.k}_overlap": result[f"top{config.k}_overlap"]})
            log.info("auto: kept %s (SQNR %.1f dB) in bf16 -> passed=%s", name, sqnr[name], result["passed"])
        summary["auto"] = {
            "max_excluded": max_excluded, "kept_in_bf16": kept, "steps": steps,
            "initial_passed": initial["passed"],
            "initial": {key: v for key, v in initial.items() if key != "layer_sqnr_db"},
            "exclude_args": [a for n in kept for a in ("--exclude", n)],
        }
        if out is not None and result["passed"]:
            summary["auto"]["repaired"] = str(_save_repaired(fp8_model, table, recipe, kept, sqnr, checkpoint, out))
    summary.update(result)
    report_dir = Path(report_dir) if report_dir is not None else Path(quantized).parent / f"{Path(quantized).name}-quality-gate"
    summary["report_json"], summary["report_png"] = _write_report(summary, report_dir, config.k)
    return summary


def _save_repaired(fp8_model, table, recipe: dict, kept: list[str], sqnr: dict, checkpoint, out) -> Path:
    from onerec.quant.export import save_quantized

    calibration = copy.deepcopy(recipe.get("calibration", {}))
    for name in kept:
        calibration.get("layers", {}).pop(name, None)
    excluded = {
        **recipe["excluded"],
        **{n: f"kept in bf16 by the quality gate's auto mode (layer SQNR {sqnr[n]:.1f} dB)" for n in kept},
    }
    report = {"recipe": recipe["recipe"], "excluded": excluded, "calibration": calibration}
    return save_quantized(fp8_model, table, report, out, source_checkpoint=checkpoint)


def _write_report(summary: dict, report_dir: Path, k: int) -> tuple[str, str]:
    from onerec.plots import pyplot

    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_dir / "quality_gate.json"
    json_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    plt = pyplot()
    cfg = summary["config"]
    verdict = "PASSED" if summary["passed"] else "FAILED"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    labels = [f"recall@{k}", f"ndcg@{k}"]
    bf16 = [summary[f"bf16_{m}"] for m in labels]
    fp8 = [summary[f"fp8_{m}"] for m in labels]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, bf16, 0.4, label="bf16", color="#7f7f7f")
    ax.bar(x + 0.2, fp8, 0.4, label="FP8", color="#1f77b4")
    for i, m in enumerate(labels):
        change = summary[f"relative_{m}_change"]
        ax.text(i + 0.2, fp8[i], "n/a" if change is None else f"{100 * change:+.2f}%", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, labels)
    ax.set_title(f"offline quality on {summary['num_users']} held-out users "
                 f"(max recall drop {100 * cfg['max_relative_recall_drop']:g}%)", fontsize=9)
    ax.legend()
    ax = axes[0, 1]
    overlap = summary[f"top{k}_overlap"]
    ax.barh([0], [overlap], color="#2ca02c" if summary["checks"]["topk_overlap"] else "#d62728")
    ax.axvline(cfg["min_topk_overlap"], color="k", ls="--", label=f"threshold {cfg['min_topk_overlap']:g}")
    ax.set_xlim(0, 1)
    ax.set_yticks([0], [f"top-{k} overlap"])
    ax.text(overlap, 0, f" {overlap:.3f}", va="center")
    ax.legend(loc="lower left")
    ax.set_title("mean share of the bf16 top-K that FP8 also recommends", fontsize=9)
    ax = axes[1, 0]
    kl = summary["kl_per_level"]
    ax.bar([f"level {i + 1}" for i in range(len(kl))], kl, color="#9467bd")
    if cfg.get("max_kl") is not None:
        ax.axhline(cfg["max_kl"], color="k", ls="--", label="threshold")
        ax.legend()
    ax.set_title("KL(bf16 || FP8) of each SID level's logits (teacher-forced, nats)", fontsize=9)
    ax = axes[1, 1]
    kept = summary.get("auto", {}).get("kept_in_bf16", [])
    sqnr = {n: v for n, v in summary["layer_sqnr_db"].items() if v is not None}
    sqnr.update({step["kept_in_bf16"]: step["layer_sqnr_db"] for step in summary.get("auto", {}).get("steps", [])})
    worst = sorted(sqnr, key=sqnr.get)[:12]
    ax.barh(worst, [sqnr[n] for n in worst], color=["#9e9e9e" if n in kept else "#1f77b4" for n in worst])
    for i, n in enumerate(worst):
        ax.text(max(sqnr[n], 0) + 0.3, i, f"{sqnr[n]:.1f}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("SQNR (dB)")
    ax.set_title("worst layers by SQNR" + (" (grey: kept in bf16 by --auto)" if kept else ""), fontsize=9)
    title = f"quality gate {verdict}: {summary['recipe']} {summary['quantized']}"
    if kept:
        first = summary["auto"]["initial"]
        first_change = first[f"relative_recall@{k}_change"]
        title += (f"\nafter --auto kept {', '.join(kept)} in bf16; before: "
                  f"{'PASSED' if first['passed'] else 'FAILED'} (recall@{k} "
                  f"{'n/a' if first_change is None else f'{100 * first_change:+.2f}%'}, "
                  f"top-{k} overlap {first[f'top{k}_overlap']:.3f}, worst layer {first['worst_layer']} "
                  f"{first['worst_layer_sqnr_db']:.1f} dB)")
    fig.suptitle(title, x=0.01, ha="left", fontsize=11,
                 color="#2ca02c" if summary["passed"] else "#d62728")
    fig.tight_layout()
    png_path = report_dir / "quality_gate.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return str(json_path), str(png_path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the bf16 reference checkpoint folder")
    parser.add_argument("--quantized", required=True, help="the quantized folder to judge")
    parser.add_argument("--data", required=True, help="data folder; its held-out split is compared")
    parser.add_argument("--thresholds", default=None, help="JSON file with QualityGateConfig fields")
    parser.add_argument("--max-users", type=int, default=None, help="compare on a seeded sample of users")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default 64)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--auto", action="store_true", help="keep the most sensitive layers in bf16 until it passes")
    parser.add_argument("--max-excluded", type=int, default=3, help="--auto: at most this many layers kept in bf16")
    parser.add_argument("--out", default=None, help="--auto: write the repaired quantized folder here")
    parser.add_argument("--report-dir", default=None, help="where quality_gate.json/.png go (default QDIR-quality-gate)")


def main(args: argparse.Namespace) -> dict:
    config = QualityGateConfig.load(args.thresholds, max_users=args.max_users, beam_size=args.beam,
                                     device=args.device)
    return run_quality_gate(args.checkpoint, args.quantized, args.data, config, args.auto, args.max_excluded,
                            args.out, args.report_dir)
