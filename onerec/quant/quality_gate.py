"""`onerec-fp8 gate quality`: FP8 vs bf16 on held-out users with the same beam search.

    onerec-fp8 gate quality --checkpoint CKPT --quantized QDIR --data DIR \
        [--thresholds FILE] [--positions N] [--auto --max-excluded N --out FIXED_QDIR]

Both models run in bf16 (the FP8 model's other layers are bf16 too) on the same held-out requests
(the test split of `--data`: each user's last `positions` interactions, each predicted from the
items before it, all positions in the same batches; optionally a seeded sample of --max-users):
- recall@K and NDCG@K of both (onerec.evaluate), their relative change and its 95% interval
  (paired cluster bootstrap: users resampled with all their positions, onerec/quant/gate_stats.py);
- mean top-K overlap: |top-K(bf16) & top-K(FP8)| / K per user, averaged;
- KL(bf16 || FP8) of each semantic-ID level's softmax, teacher-forced on the true target;
- each FP8 layer's SQNR against its bf16 layer on the same inputs, and the worst one;
- the noise floor: the same recall/NDCG intervals and overlap for bf16 against the fp32 model,
  i.e. how much the numerics move the ranking before FP8 does anything; and from it, before the
  FP8 model runs, the power (`power`): the smallest change these users and positions can tell
  from zero, and which FP8 changes would then pass or fail at the margin.

Verdict (`verdict`; `passed` is true only for "passed"): non-inferiority of recall@K and NDCG@K
with a relative margin (gate_stats): **failed** when an interval lies entirely below -margin or a
sensitive check fails (top-K overlap, and the KL / layer SQNR limits when set), **passed** when
every interval's lower bound is above -margin, else **inconclusive**, with the users it would
need (`users_needed`) or the positions per user that would (`positions_needed`; None when the
correlation of one user's positions caps what more positions give). The CLI exits 0 / 3
(failed) / 4 (inconclusive). `seconds` says what each part cost.

Defaults, and why: margin 5% relative for both metrics: a drop smaller than that is below what
an A/B test of a recommender resolves, and about twice the shift bf16 alone shows against fp32
on a real ~950-user data set (2.3%), so FP8 is held to "no worse than the numerics noise we
already ship". 95% two-sided intervals (the usual evidence level; a passed verdict then means a
drop beyond the margin is ruled out at 97.5% one-sided). All held-out users by default: the
interval's width, not a fixed count, says whether they were enough. 10 positions per user: on a
MovieLens-100K-shaped set (943 users, recall@10 ~0.14) one position gives a ~5% half-width
(inconclusive whatever FP8 does); ten give about a third of that, so an FP8 change under 1%
passes at the 5% margin (tests/unit/test_quality_power.py shows it on data of that shape), for ten
times the beam searches (positions run batched). Top-10 overlap >= 0.90 is the sensitive check
that catches a broken layer even when the sample is small.

`--auto` uses the same decision: while the verdict is "failed" it keeps the most sensitive
layers (lowest SQNR first) in bf16, one at a time, until the gate no longer fails or
--max-excluded layers are spent, and records which; with --out it writes the repaired folder
(when passed). An inconclusive verdict stops it: more bf16 layers cannot make a small sample
decisive. Results: JSON on stdout and quality_gate.json/.png (error bars) in --report-dir.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onerec.calibration_table import HELD_OUT_POSITIONS
from onerec.errors import UserError
from onerec.evaluate import per_user_metrics, ranking_metrics, recommend, topk_overlap
from onerec.plots import pyplot
from onerec.quant import gate_stats

log = logging.getLogger(__name__)


@dataclass
class QualityGateConfig:
    # thresholds (module doc: the defaults and why)
    max_relative_recall_drop: float = 0.05  # non-inferiority margin of recall@k, relative
    min_topk_overlap: float = 0.90
    max_relative_ndcg_drop: float | None = 0.05  # margin of ndcg@k (None: reported, not judged)
    max_kl: float | None = None  # on the worst SID level, nats
    min_layer_sqnr_db: float | None = None
    # how the comparison runs
    k: int = 10
    beam_size: int = 64
    batch_size: int = 256
    split: str = "test"
    max_users: int | None = None
    positions: int = HELD_OUT_POSITIONS  # held-out positions per user: the last N interactions (module doc: why 10)
    seed: int = 0  # of the --max-users sample and of the bootstrap
    device: str = "cpu"  # cuda: the FP8 GEMMs run on the GPU's tensor cores
    confidence: float = 0.95  # two-sided, of the relative-change intervals
    bootstrap_resamples: int = gate_stats.BOOTSTRAP_RESAMPLES
    noise_floor: bool = True  # also compare the fp32 model with bf16
    # the fp32 pass runs on a seeded sample of at most this many users (None: all); fp32 costs
    # 8.5x a bf16 pass on the H200 (1b: 1.78 s vs 0.21 s per batch of 256, 2026-12-04), and the
    # power only needs the per-user spread, scaled to all users (gate_stats.scale_to_users)
    noise_floor_users: int | None = 1024
    # on CUDA the fp32 pass multiplies in TF32 (10-bit mantissa, fp32 accumulation): still 8x finer
    # than bf16's 7 bits, so bf16's own shift dominates the floor, at a fraction of IEEE fp32's cost
    noise_floor_tf32: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise UserError(f"confidence must be in (0, 1), got {self.confidence}")
        margins = (self.max_relative_recall_drop, self.max_relative_ndcg_drop)
        if any(m is not None and m < 0 for m in margins):
            raise UserError("max_relative_recall_drop / max_relative_ndcg_drop are margins: not negative")
        if self.bootstrap_resamples < 100:
            raise UserError(f"bootstrap_resamples must be at least 100, got {self.bootstrap_resamples}")
        if self.positions < 1:
            raise UserError(f"positions must be at least 1, got {self.positions}")
        if self.noise_floor_users is not None and self.noise_floor_users < 2:
            raise UserError(f"noise_floor_users must be at least 2 (or null: all users), got {self.noise_floor_users}")

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> QualityGateConfig:
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


def level_kl(bf16_model, fp8_model, calibration) -> list[float]:
    """Mean KL(bf16 || fp8) per SID level of the teacher-forced softmax, in nats."""
    import torch  # heavy: torch

    from onerec.quant.calibrate import run_model  # heavy: torch

    total, n = None, 0
    for batch in calibration.batches(bf16_model):
        p = torch.log_softmax(run_model(bf16_model, batch).float(), -1)
        q = torch.log_softmax(run_model(fp8_model, batch).float(), -1)
        kl = (p.exp() * (p - q)).sum(-1).sum(0).double()  # [n_levels]
        total = kl if total is None else total + kl
        n += p.shape[0]
    return [float(v) / n for v in total] if n else []


def paired_intervals(ref_items, new_items, targets, users, config: QualityGateConfig) -> dict:
    """recall@k and ndcg@k: the relative-change interval of `new` vs `ref` on the same positions
    (`users`: each position's user, the unit the bootstrap resamples)."""
    k = config.k
    ref, new = per_user_metrics(ref_items, targets, k), per_user_metrics(new_items, targets, k)
    return {
        f"{name}@{k}": gate_stats.paired_relative_change(r, q, config.confidence, config.bootstrap_resamples,
                                                          config.seed, users=users)
        for name, r, q in (("recall", ref[0], new[0]), ("ndcg", ref[1], new[1]))
    }


def _margins(config: QualityGateConfig) -> dict[str, float | None]:
    return {f"recall@{config.k}": config.max_relative_recall_drop, f"ndcg@{config.k}": config.max_relative_ndcg_drop}


def _percent(interval: dict) -> str:
    if interval["estimate"] is None:
        return "n/a"
    return f"{100 * interval['estimate']:+.2f}% [{100 * interval['low']:+.2f}%, {100 * interval['high']:+.2f}%]"


class QualityComparison:
    """bf16 reference results computed once; `compare(fp8_model)` runs the FP8 side and judges.

    `fp32_model` (optional): the same checkpoint in fp32, for the noise floor (bf16 vs fp32).
    """

    def __init__(self, bf16_model, table, requests, config: QualityGateConfig, fp32_model=None):
        import torch  # heavy

        from onerec.quant.calibrate import Calibration  # heavy: torch

        self.bf16_model, self.table, self.requests, self.config = bf16_model, table, requests, config
        self.targets = requests["target"].to_numpy(np.int64)
        self.users = requests["user_id"].to_numpy()
        self.num_users = int(len(np.unique(self.users)))
        # KL and layer SQNR on each user's last position: teacher-forced passes need no more
        last = requests.groupby("user_id", sort=False).tail(1).reset_index(drop=True)
        self.calibration = Calibration(last, table, batch_size=min(config.batch_size, 128))
        self.bf16_items, _ = recommend(
            bf16_model, table, requests, config.k, config.beam_size, config.batch_size, config.device, progress=True
        )
        self.bf16_metrics = ranking_metrics(self.bf16_items, self.targets, config.k)
        self.noise_floor = self.power = None
        if fp32_model is not None:
            sample = self._noise_floor_sample()
            tf32 = config.noise_floor_tf32 and str(config.device).startswith("cuda")
            previous_precision = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            try:
                fp32_items, _ = recommend(fp32_model, table, requests[sample].reset_index(drop=True), config.k,
                                          config.beam_size, config.batch_size, config.device, progress=True)
            finally:
                torch.set_float32_matmul_precision(previous_precision)
            bf16_sample = self.bf16_items[sample]
            self.noise_floor = {
                "compared": "bf16 vs fp32 (the same checkpoint)",
                "reference_matmuls": "tf32" if tf32 else "ieee fp32",
                **paired_intervals(fp32_items, bf16_sample, self.targets[sample], self.users[sample], config),
                f"top{config.k}_overlap": topk_overlap(fp32_items, bf16_sample, config.k),
            }
            self.power = {m: gate_stats.power(gate_stats.scale_to_users(self.noise_floor[m], self.num_users),
                                              margin, config.positions)
                          for m, margin in _margins(config).items() if margin is not None}
            for m, p in self.power.items():
                if p["min_detectable_change"] is None:
                    log.info("power of %s: bf16 and fp32 agree on all %d positions (%d users): no disagreement "
                             "to scale from", m, len(self.targets), self.num_users)
                else:
                    log.info("power of %s on %d users x %d positions: smallest detectable change +-%.2f%%; FP8 would "
                             "pass above %+.2f%% and fail below %+.2f%% (from bf16 vs fp32)", m, self.num_users,
                             len(self.targets), 100 * p["min_detectable_change"], 100 * p["passes_above"],
                             100 * p["fails_below"])
                if p["decides_at_margin"] is False:
                    log.warning("power of %s: even an unchanged FP8 would be inconclusive; about %s users or %s "
                                "positions per user would decide it", m, p["users_needed"], p["positions_needed"])

    def _noise_floor_sample(self) -> np.ndarray:
        """The positions of a seeded sample of at most `noise_floor_users` users (all their positions)."""
        limit = self.config.noise_floor_users
        unique = np.unique(self.users)
        if limit is None or len(unique) <= limit:
            return np.ones(len(self.users), dtype=bool)
        chosen = np.random.default_rng(self.config.seed).choice(unique, limit, replace=False)
        return np.isin(self.users, chosen)

    def layer_sqnr(self, fp8_model) -> dict[str, float | None]:
        from onerec.quant.calibrate import measure_sqnr  # heavy: torch
        from onerec.quant.export import fp8_layers  # heavy: safetensors, torch

        return measure_sqnr(self.bf16_model, fp8_layers(fp8_model), self.calibration, desc="layer sqnr")

    def compare(self, fp8_model, sqnr: dict[str, float | None] | None = None) -> dict:
        c, k = self.config, self.config.k
        items, _ = recommend(fp8_model, self.table, self.requests, k, c.beam_size, c.batch_size, c.device, progress=True)
        return self.judge(items, level_kl(self.bf16_model, fp8_model, self.calibration),
                          self.layer_sqnr(fp8_model) if sqnr is None else sqnr)

    def judge(self, items: np.ndarray, kl: list[float], sqnr: dict[str, float | None]) -> dict:
        """The verdict on FP8 recommendations `items` (same users and order as the bf16 ones)."""
        c, k = self.config, self.config.k
        b, q = self.bf16_metrics, ranking_metrics(items, self.targets, k)
        intervals = paired_intervals(self.bf16_items, items, self.targets, self.users, c)
        verdicts, needed, needed_positions = {}, {}, {}
        for metric, margin in _margins(c).items():
            intervals[metric]["margin"] = margin
            if margin is None:
                continue
            verdicts[metric] = gate_stats.non_inferiority(intervals[metric], margin)
            if verdicts[metric] == gate_stats.INCONCLUSIVE:
                needed[metric] = gate_stats.users_needed(intervals[metric], margin)
                needed_positions[metric] = gate_stats.positions_needed(intervals[metric], margin, c.positions)
        overlap = topk_overlap(self.bf16_items, items, k)
        measured = {n: v for n, v in sqnr.items() if v is not None}
        worst = min(measured.items(), key=lambda kv: kv[1]) if measured else (None, None)
        sensitive = {"topk_overlap": overlap >= c.min_topk_overlap}
        if c.max_kl is not None:
            sensitive["kl"] = max(kl, default=0.0) <= c.max_kl
        if c.min_layer_sqnr_db is not None:
            sensitive["layer_sqnr"] = worst[1] is None or worst[1] >= c.min_layer_sqnr_db
        verdict = gate_stats.combine(
            [*verdicts.values(), *(gate_stats.PASSED if ok else gate_stats.FAILED for ok in sensitive.values())]
        )
        checks = {"recall": verdicts[f"recall@{k}"] == gate_stats.PASSED, **sensitive}
        if f"ndcg@{k}" in verdicts:
            checks["ndcg"] = verdicts[f"ndcg@{k}"] == gate_stats.PASSED
        users_needed = positions_needed = None
        if verdict == gate_stats.INCONCLUSIVE:
            known = [n for n in needed.values() if n is not None]
            users_needed = max(known) if known else None
            # positions decide it only when they decide every inconclusive metric
            if needed_positions and None not in needed_positions.values():
                positions_needed = max(needed_positions.values())
        return {
            "passed": verdict == gate_stats.PASSED,
            "verdict": verdict,
            "reason": self._reason(verdict, verdicts, sensitive, intervals, users_needed, positions_needed),
            "checks": checks,
            "metric_verdicts": verdicts,
            "intervals": intervals,
            "users_needed": users_needed,
            "positions_needed": positions_needed,
            "noise_floor": self.noise_floor,
            "power": self.power,
            "num_users": self.num_users,
            "num_positions": int(len(self.targets)),
            "positions": c.positions,
            f"bf16_recall@{k}": b[f"recall@{k}"], f"fp8_recall@{k}": q[f"recall@{k}"],
            f"bf16_ndcg@{k}": b[f"ndcg@{k}"], f"fp8_ndcg@{k}": q[f"ndcg@{k}"],
            f"relative_recall@{k}_change": intervals[f"recall@{k}"]["estimate"],
            f"relative_ndcg@{k}_change": intervals[f"ndcg@{k}"]["estimate"],
            f"top{k}_overlap": overlap,
            "kl_per_level": kl, "kl_max": max(kl, default=None),
            "worst_layer": worst[0], "worst_layer_sqnr_db": worst[1],
            "layer_sqnr_db": sqnr,
        }

    def _reason(self, verdict, verdicts, sensitive, intervals, users_needed, positions_needed) -> str:
        shown = "; ".join(f"{m} {_percent(intervals[m])} (margin -{100 * intervals[m]['margin']:g}%)"
                          for m in verdicts)
        if verdict == gate_stats.PASSED:
            return f"non-inferior: {shown}"
        failed = [n for n, ok in sensitive.items() if not ok] + [m for m, v in verdicts.items() if v == "failed"]
        if verdict == gate_stats.FAILED:
            return f"failed {', '.join(failed)}: {shown}"
        more = [f"about {users_needed} users" if users_needed else "",
                f"{positions_needed} positions per user" if positions_needed else ""]
        more = " or ".join(m for m in more if m)
        return (f"inconclusive on {self.num_users} users x {self.config.positions} positions: {shown}"
                + (f"; {more} would decide it" if more else ""))


def _to_bf16_linear(bf16_model, name: str):
    return copy.deepcopy(bf16_model.get_submodule(name))


def run_quality_gate(
    checkpoint: str | Path, quantized: str | Path, data: str | Path, config: QualityGateConfig | None = None,
    auto: bool = False, max_excluded: int = 3, out: str | Path | None = None, report_dir: str | Path | None = None,
) -> dict:
    """The quality gate as a function (the pipeline step calls this); see the module doc."""
    import torch  # heavy: torch

    from onerec.checkpoint import load_checkpoint  # heavy: safetensors, torch
    from onerec.data import held_out_requests, load_dataset  # heavy: pandas, torch
    from onerec.quant.export import check_made_from, load_quantized  # heavy: safetensors, torch
    from onerec.quant.recipes import _replace  # heavy: torch

    config = config or QualityGateConfig()
    started = time.monotonic()
    if auto and max_excluded < 1:
        raise UserError("--max-excluded must be at least 1 with --auto")
    if out is not None and not auto:
        raise UserError("--out writes the folder that --auto repaired: give --auto too")
    dataset = load_dataset(data)
    bf16_model, table = load_checkpoint(checkpoint, device=config.device, dtype=torch.bfloat16)

    previous_threads = torch.get_num_threads()
    if str(config.device).startswith("cpu"):  # a tiny model is fastest on one thread (onerec.train)
        from onerec.train import default_threads  # heavy: pandas

        torch.set_num_threads(default_threads(bf16_model.cfg))
    try:
        fp8_model, q_table, recipe = load_quantized(quantized, device=config.device)
        check_made_from(quantized, recipe, checkpoint, table, q_table)
        requests = held_out_requests(dataset, config.split, bf16_model.cfg.context_len, config.positions,
                                     config.max_users, config.seed, source=str(data))
        log.info("quality gate: %d users, %d positions (up to %d per user)", requests["user_id"].nunique(),
                 len(requests), config.positions)

        seconds = {"load": time.monotonic() - started}
        fp32_model = load_checkpoint(checkpoint, device=config.device, dtype=torch.float32)[0] if config.noise_floor else None
        comparison = QualityComparison(bf16_model, table, requests, config, fp32_model)
        del fp32_model
        seconds["bf16_and_noise_floor"] = time.monotonic() - started - sum(seconds.values())
        sqnr = comparison.layer_sqnr(fp8_model)
        result = initial = comparison.compare(fp8_model, sqnr)
        seconds["fp8"] = time.monotonic() - started - sum(seconds.values())
        log.info("quality gate: %s (%s)", result["verdict"], result["reason"])
        summary = {
            "gate": "quality", "checkpoint": str(checkpoint), "quantized": str(quantized), "data": str(data),
            "recipe": recipe["recipe"]["name"], "config": dataclasses.asdict(config),
        }
        if bf16_model.cfg.categorical_features:  # unseen values took the unknown bucket: say how many
            from onerec.features import count_unseen  # heavy: pandas

            summary["unseen_profile_values"] = count_unseen(requests, bf16_model.cfg.categorical_features)
        if auto:
            ranking = sorted((n for n, v in sqnr.items() if v is not None), key=lambda n: sqnr[n])
            kept, steps = [], []
            while result["verdict"] == gate_stats.FAILED and len(kept) < min(max_excluded, len(ranking)):
                name = ranking[len(kept)]
                _replace(fp8_model, name, _to_bf16_linear(bf16_model, name))
                kept.append(name)
                remaining = {n: v for n, v in sqnr.items() if n not in kept}
                result = comparison.compare(fp8_model, remaining)
                steps.append({"kept_in_bf16": name, "layer_sqnr_db": sqnr[name], "passed": result["passed"],
                              "verdict": result["verdict"],
                              f"relative_recall@{config.k}_change": result[f"relative_recall@{config.k}_change"],
                              f"top{config.k}_overlap": result[f"top{config.k}_overlap"]})
                log.info("auto: kept %s (SQNR %.1f dB) in bf16 -> %s", name, sqnr[name], result["verdict"])
            summary["auto"] = {
                "max_excluded": max_excluded, "kept_in_bf16": kept, "steps": steps,
                "initial_passed": initial["passed"], "initial_verdict": initial["verdict"],
                "initial": {key: v for key, v in initial.items() if key != "layer_sqnr_db"},
                "exclude_args": [a for n in kept for a in ("--exclude", n)],
            }
            if out is not None and result["passed"]:
                summary["auto"]["repaired"] = str(_save_repaired(fp8_model, table, recipe, kept, sqnr, checkpoint, out))
        summary.update(result)
        seconds["total"] = time.monotonic() - started
        summary["seconds"] = {name: round(v, 2) for name, v in seconds.items()}
        report_dir = Path(report_dir) if report_dir is not None else Path(quantized).parent / f"{Path(quantized).name}-quality-gate"
        summary["report_json"], summary["report_png"] = _write_report(summary, report_dir, config.k)
        return summary
    finally:
        torch.set_num_threads(previous_threads)


def _save_repaired(fp8_model, table, recipe: dict, kept: list[str], sqnr: dict, checkpoint, out) -> Path:
    from onerec.quant.export import save_quantized  # heavy: safetensors, torch

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
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_dir / "quality_gate.json"
    json_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    plt = pyplot()
    cfg = summary["config"]
    verdict = summary["verdict"].upper()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    labels = [f"recall@{k}", f"ndcg@{k}"]
    x = np.arange(len(labels))
    series = [("FP8 vs bf16", summary["intervals"], "#1f77b4")]
    if summary.get("noise_floor"):
        series.append(("bf16 vs fp32 (noise floor)", summary["noise_floor"], "#7f7f7f"))
    width = 0.8 / len(series)
    for j, (name, intervals, color) in enumerate(series):
        pos = x - 0.4 + width * (j + 0.5)
        est = [100 * (intervals[m]["estimate"] or 0.0) for m in labels]
        err = [[100 * ((intervals[m]["estimate"] or 0.0) - (intervals[m]["low"] or 0.0)) for m in labels],
               [100 * ((intervals[m]["high"] or 0.0) - (intervals[m]["estimate"] or 0.0)) for m in labels]]
        ax.bar(pos, est, width, yerr=err, capsize=6, label=name, color=color, ecolor=color)
    for i, m in enumerate(labels):
        margin = summary["intervals"][m].get("margin")
        if margin is not None:
            ax.hlines(-100 * margin, i - 0.45, i + 0.45, colors="#d62728", linestyles="--")
    ax.axhline(0, color="k", lw=0.5)
    ticks = []
    for m in labels:
        lines = [f"{m}: {summary['metric_verdicts'].get(m, 'not judged')}", f"FP8 {_percent(summary['intervals'][m])}"]
        if summary.get("noise_floor"):
            lines.append(f"floor {_percent(summary['noise_floor'][m])}")
        ticks.append("\n".join(lines))
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_ylabel("relative change (%)")
    ax.set_title(f"relative change with {100 * cfg['confidence']:g}% paired cluster-bootstrap intervals on "
                 f"{summary['num_users']} users x {cfg['positions']} positions (red: -margin)", fontsize=9)
    ax.legend(fontsize=8)
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
                  f"{first['verdict'].upper()} (recall@{k} "
                  f"{'n/a' if first_change is None else f'{100 * first_change:+.2f}%'}, "
                  f"top-{k} overlap {first[f'top{k}_overlap']:.3f}, worst layer {first['worst_layer']} "
                  f"{first['worst_layer_sqnr_db']:.1f} dB)")
    if summary["verdict"] == "inconclusive":
        title += f"\n{summary['reason']}"
    fig.suptitle(title, x=0.01, ha="left", fontsize=11,
                 color={"passed": "#2ca02c", "failed": "#d62728"}.get(summary["verdict"], "#ff7f0e"))
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
    parser.add_argument("--positions", type=int, default=None,
                        help="held-out positions per user: the last N interactions (default 10)")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default 64)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--auto", action="store_true", help="keep the most sensitive layers in bf16 until it passes")
    parser.add_argument("--max-excluded", type=int, default=3, help="--auto: at most this many layers kept in bf16")
    parser.add_argument("--out", default=None, help="--auto: write the repaired quantized folder here")
    parser.add_argument("--report-dir", default=None, help="where quality_gate.json/.png go (default QDIR-quality-gate)")


def main(args: argparse.Namespace) -> dict:
    config = QualityGateConfig.load(args.thresholds, max_users=args.max_users, beam_size=args.beam,
                                     device=args.device, positions=args.positions)
    return run_quality_gate(args.checkpoint, args.quantized, args.data, config, args.auto, args.max_excluded,
                            args.out, args.report_dir)
