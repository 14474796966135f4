"""Validate calibration data with Great Expectations before anything is quantized.

The suites are defined here, in code, and versioned with the project (SUITE_VERSION). Two
suites, each run on its own batch:

  calibration_requests (one row per request; the list column `history` is summarised into
  history_length / history_unknown_items, the target into target_known):
    schema and types, no nulls, minimum row count, history lengths within bounds, every history
    and target item present in the checkpoint's semantic-id table, numeric profile features
    within mean +- z * std of the model's training statistics (the normaliser buffers in the
    weights); categorical profile features (the model's vocabularies in config.json): text or
    missing values only (<name>__is_text), and the share of values outside the vocabulary (they
    take the unknown bucket) at most max_unseen_category_fraction (<name>__unseen);
  calibration_drift (vs the previous accepted calibration snapshot, when there is one):
    KL divergence of the item-popularity distribution (history items bucketed by the reference's
    popularity deciles, unseen items in their own bucket), of the history-length distribution
    (bucketed by the reference's deciles) and of each categorical feature's value distribution
    (the reference's CATEGORY_BUCKETS most frequent values, the rest and unseen values in one
    bucket; category__<name>).

Data Docs HTML is written to <report_dir>/data_docs/ (styled with no network: tasks.data_docs)
and a PNG of the checks and the drift to
<report_dir>/calibration_validation.png. A passing snapshot's profile is stored under the table's
digest and becomes the reference (s3://BUCKET/PREFIX/calibration/accepted/profile.json) when a
version made from it is approved (tasks.approval.accept_calibration).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from onerec.errors import UserError
from onerec.features import as_strings, is_categorical
from tasks.data_docs import make_offline

log = logging.getLogger(__name__)

SUITE_VERSION = "1"
POPULARITY_BUCKETS = 10
LENGTH_QUANTILES = np.linspace(0.1, 0.9, 9)
CATEGORY_BUCKETS = 50  # most frequent values of a categorical feature compared one by one
MISSING = "<missing>"
REQUIRED_COLUMNS = {"user_id": "integer", "history": "list", "target": "integer"}


# --- profiles: what the drift check compares ---------------------------------------------------------


def data_profile(requests: pd.DataFrame, calibration_sha256: str = "") -> dict:
    """The JSON-able summary of a calibration table that the next run's drift check compares to."""
    items = np.concatenate([np.asarray(h, dtype=np.int64) for h in requests["history"]] or [np.zeros(0, np.int64)])
    ids, counts = np.unique(items, return_counts=True)
    lengths = requests["history"].map(len).to_numpy()
    return {
        "suite_version": SUITE_VERSION,
        "calibration_sha256": calibration_sha256,
        "rows": int(len(requests)),
        "item_counts": {str(int(i)): int(c) for i, c in zip(ids, counts, strict=True)},
        "history_lengths": [int(x) for x in lengths],
        "category_counts": {
            col: {str(k): int(v) for k, v in _category_values(requests[col]).value_counts().items()}
            for col in requests.columns if col not in REQUIRED_COLUMNS and is_categorical(requests[col])
        },
    }


def _category_values(values: pd.Series) -> pd.Series:
    return as_strings(values).fillna(MISSING)


def category_buckets(counts: dict[str, int]) -> tuple[dict[str, int], list[float]]:
    """value -> bucket of the reference's most frequent values, and the bucket weights; the last
    bucket holds every other value (rarer or unseen), with at least a little mass."""
    ranked = sorted(counts, key=lambda v: (-counts[v], v))[:CATEGORY_BUCKETS]
    bucket_of = {v: i for i, v in enumerate(ranked)}
    weights = np.zeros(len(ranked) + 1)
    for value, count in counts.items():
        weights[bucket_of.get(value, len(ranked))] += count
    return bucket_of, _smooth(weights / max(weights.sum(), 1))


def popularity_buckets(reference: dict) -> tuple[dict[int, int], list[float]]:
    """Map item -> popularity bucket of the reference and the reference's bucket weights.

    Items sorted by reference count; bucket b holds the items whose cumulative share starts in
    [b/N, (b+1)/N). Bucket N is "unseen in the reference": its weight is the Good-Turing estimate
    of unseen mass (share of items seen once), so a fresh sample of the same distribution does
    not look like drift just because the long tail differs.
    """
    counts = {int(k): v for k, v in reference["item_counts"].items()}
    total = sum(counts.values()) or 1
    order = sorted(counts, key=lambda i: (-counts[i], i))
    bucket_of, weights, cum = {}, np.zeros(POPULARITY_BUCKETS + 1), 0
    for item in order:
        b = min(int(cum / total * POPULARITY_BUCKETS), POPULARITY_BUCKETS - 1)
        bucket_of[item] = b
        weights[b] += counts[item]
        cum += counts[item]
    unseen = max(sum(1 for c in counts.values() if c == 1) / total, 1e-3)
    weights = weights / total * (1 - unseen)
    weights[POPULARITY_BUCKETS] = unseen
    return bucket_of, _smooth(weights)


def length_buckets(reference: dict) -> tuple[np.ndarray, list[float]]:
    lengths = np.asarray(reference["history_lengths"], dtype=np.float64)
    edges = np.unique(np.quantile(lengths, LENGTH_QUANTILES)) if len(lengths) else np.zeros(0)
    weights = np.bincount(np.digitize(lengths, edges), minlength=len(edges) + 1).astype(np.float64)
    return edges, _smooth(weights / max(weights.sum(), 1))


def _smooth(weights: np.ndarray, eps: float = 1e-3) -> list[float]:
    """Every bucket a little mass (an empty reference bucket would make KL infinite), summing to 1."""
    w = np.asarray(weights, dtype=np.float64) + eps
    return (w / w.sum()).tolist()


# --- the request table, summarised for the checks ----------------------------------------------------


def _is_int_list(h) -> bool:
    return isinstance(h, list | tuple | np.ndarray) and all(isinstance(i, int | np.integer) for i in h)


def summarise(raw: pd.DataFrame, table: np.ndarray, vocabularies: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """One row per request: the scalar columns as they are, the history list as numbers to check,
    and per categorical feature whether the value is text and whether the model's vocabulary lacks it."""
    known = (table >= 0).all(1)

    def unknown_items(h) -> float:
        if not _is_int_list(h):
            return np.nan
        ids = np.asarray(h, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(known))
        return float((~inside).sum() + (~known[ids[inside]]).sum())

    out = raw.drop(columns=["history"], errors="ignore").copy()
    if "history" in raw:
        out["history_length"] = [float(len(h)) if _is_int_list(h) else np.nan for h in raw["history"]]
        out["history_unknown_items"] = [unknown_items(h) for h in raw["history"]]
    if "target" in raw and pd.api.types.is_integer_dtype(raw["target"]):
        t = raw["target"].to_numpy()
        inside = (t >= 0) & (t < len(known))
        target_known = np.zeros(len(t), dtype=np.int64)
        target_known[inside] = known[t[inside]]
        out["target_known"] = target_known
    for name, vocabulary in (vocabularies or {}).items():
        if name not in raw:
            continue
        values = raw[name].astype(object)
        present = values.notna().to_numpy()
        out[f"{name}__is_text"] = np.array([(not p) or isinstance(v, str) for v, p in zip(values, present, strict=True)],
                                           dtype=np.int64)
        vocab = set(vocabulary)
        out[f"{name}__unseen"] = np.array([float(p and str(v) not in vocab) for v, p in zip(values, present, strict=True)])
    return out


def _vocabularies(checkpoint_dir: Path) -> dict[str, list[str]]:
    return json.loads((checkpoint_dir / "config.json").read_text()).get("categorical_features", {})


def _profile_stats(checkpoint_dir: Path) -> dict[str, tuple[float, float]]:
    """feature -> (mean, std) of the model's training data, from the normaliser buffers."""
    from safetensors import safe_open  # heavy: safetensors

    from onerec.checkpoint import check_weights_file  # heavy: torch

    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    features = cfg.get("profile_features", [])
    if not features:
        return {}
    check_weights_file(checkpoint_dir / "model.safetensors")
    with safe_open(str(checkpoint_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        if not {"context.profile_mean", "context.profile_std"} <= keys:
            return {}
        mean = f.get_tensor("context.profile_mean").float().tolist()
        std = f.get_tensor("context.profile_std").float().tolist()
    return {name: (m, s) for name, m, s in zip(features, mean, std, strict=True)}


# --- the suites ---------------------------------------------------------------------------------------


def request_suite(cfg, profile_stats: dict, context_len: int, vocabularies: dict[str, list[str]] | None = None):
    import great_expectations as gx  # heavy: Great Expectations
    import great_expectations.expectations as gxe  # heavy: Great Expectations

    max_len = cfg.max_history_length or context_len
    suite = gx.ExpectationSuite(name="calibration_requests", meta={"suite_version": SUITE_VERSION})
    add = suite.add_expectation
    add(gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_calibration_rows))
    for col in ["user_id", "target", "history_length", "history_unknown_items", "target_known", *profile_stats]:
        add(gxe.ExpectColumnToExist(column=col))
        add(gxe.ExpectColumnValuesToNotBeNull(column=col))
    for col in ("user_id", "target"):
        add(gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=["int64", "int32", "int16", "int8"]))
        add(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0))
    add(gxe.ExpectColumnValuesToBeBetween(column="history_length", min_value=cfg.min_history_length, max_value=max_len))
    mostly = 1.0 - cfg.max_unknown_item_fraction
    add(gxe.ExpectColumnValuesToBeBetween(column="history_unknown_items", max_value=0, mostly=mostly))
    add(gxe.ExpectColumnValuesToBeInSet(column="target_known", value_set=[1], mostly=mostly))
    for name, (mean, std) in profile_stats.items():
        add(gxe.ExpectColumnValuesToBeInTypeList(column=name, type_list=["float32", "float64", "int64", "int32"]))
        span = cfg.max_profile_zscore * max(std, 1e-6)
        add(gxe.ExpectColumnValuesToBeBetween(column=name, min_value=mean - span, max_value=mean + span))
    for name in vocabularies or {}:
        add(gxe.ExpectColumnToExist(column=name))
        add(gxe.ExpectColumnValuesToBeInSet(column=f"{name}__is_text", value_set=[1]))
        add(gxe.ExpectColumnMeanToBeBetween(column=f"{name}__unseen", max_value=cfg.max_unseen_category_fraction))
    return suite


def drift_suite(cfg, reference: dict):
    import great_expectations as gx  # heavy: Great Expectations
    import great_expectations.expectations as gxe  # heavy: Great Expectations

    _, pop_weights = popularity_buckets(reference)
    edges, len_weights = length_buckets(reference)
    suite = gx.ExpectationSuite(
        name="calibration_drift",
        meta={"suite_version": SUITE_VERSION, "reference_calibration_sha256": reference.get("calibration_sha256")},
    )
    suite.add_expectation(gxe.ExpectColumnKLDivergenceToBeLessThan(
        column="popularity_bucket", threshold=cfg.max_popularity_kl,
        partition_object={"values": list(range(len(pop_weights))), "weights": pop_weights},
    ))
    suite.add_expectation(gxe.ExpectColumnKLDivergenceToBeLessThan(
        column="history_length_bucket", threshold=cfg.max_history_length_kl,
        partition_object={"values": list(range(len(len_weights))), "weights": len_weights},
    ))
    for name, counts in reference.get("category_counts", {}).items():
        _, weights = category_buckets(counts)
        suite.add_expectation(gxe.ExpectColumnKLDivergenceToBeLessThan(
            column=f"category__{name}", threshold=cfg.max_category_kl,
            partition_object={"values": list(range(len(weights))), "weights": weights},
        ))
    return suite


def drift_frame(current: dict, reference: dict) -> pd.DataFrame:
    """Per history-item occurrence: its reference popularity bucket; per request: its length bucket.

    Both columns in one frame (the shorter one padded with NaN, which the KL check ignores).
    """
    bucket_of, _ = popularity_buckets(reference)
    edges, _ = length_buckets(reference)
    unseen = POPULARITY_BUCKETS
    pop = np.concatenate([
        np.full(c, bucket_of.get(int(i), unseen)) for i, c in current["item_counts"].items()
    ] or [np.zeros(0)])
    lengths = np.digitize(np.asarray(current["history_lengths"], dtype=np.float64), edges)
    columns = {"popularity_bucket": pop, "history_length_bucket": lengths}
    for name, counts in reference.get("category_counts", {}).items():
        bucket_of, weights = category_buckets(counts)
        current_counts = current.get("category_counts", {}).get(name, {})
        columns[f"category__{name}"] = np.concatenate(
            [np.full(c, bucket_of.get(v, len(weights) - 1)) for v, c in current_counts.items()] or [np.zeros(0)]
        )
    n = max(len(c) for c in columns.values())
    pad = lambda a: np.concatenate([a.astype(np.float64), np.full(n - len(a), np.nan)])  # noqa: E731
    return pd.DataFrame({name: pad(c) for name, c in columns.items()})


# --- running it ---------------------------------------------------------------------------------------


def _context(docs_dir: Path):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # never phone home from a pipeline step
    import great_expectations as gx  # heavy: Great Expectations

    ctx = gx.get_context(mode="ephemeral")
    for site, site_config in list(ctx.list_data_docs_sites().items()):
        # the ephemeral context's default site is an (empty) temp folder: remove it, keep ours
        stray = Path(site_config.get("store_backend", {}).get("base_directory", ""))
        ctx.delete_data_docs_site(site)
        if stray.is_dir() and stray.parent == Path(tempfile.gettempdir()) and not any(stray.iterdir()):
            stray.rmdir()
    ctx.add_data_docs_site(site_name="calibration", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    return ctx


def _run_suite(ctx, name: str, suite, frame: pd.DataFrame, run_name: str):
    import great_expectations as gx  # heavy: Great Expectations
    from great_expectations.core.run_identifier import RunIdentifier  # heavy: Great Expectations

    source = ctx.data_sources.add_or_update_pandas(name)
    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(suite)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    # the run's name in Data Docs: which calibration table was checked (else GX shows __none__)
    return vd.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY", run_id=RunIdentifier(run_name))


def _failures(result) -> list[dict]:
    failed = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "partition_object")}
        res = r.result or {}
        observed = res.get("observed_value")
        if observed is None and "unexpected_count" in res:
            observed = f"{res['unexpected_count']} unexpected, e.g. {res.get('partial_unexpected_list', [])[:5]}"
        if r.exception_info and r.exception_info.get("raised_exception"):
            observed = f"error: {r.exception_info.get('exception_message')}"
        failed.append({"expectation": cfg.type, **{k: _jsonable(v) for k, v in kwargs.items()},
                       "observed": _jsonable(observed)})
    return failed


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict | list | str | int | float | bool) or v is None:
        return v
    return str(v)


def _read_raw(path: Path) -> pd.DataFrame:
    try:
        raw = pd.read_parquet(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot be read as parquet ({exc})") from None
    if "history" in raw:  # parquet list columns come back as numpy arrays
        raw["history"] = raw["history"].map(lambda h: h.tolist() if isinstance(h, np.ndarray) else h)
    return raw


def validate_calibration(
    cfg, calibration_path: str | Path, checkpoint_dir: str | Path, report_dir: str | Path,
    reference: dict | None = None, calibration_sha256: str = "",
) -> dict:
    """Run both suites; returns {passed, failed: [...], drift, data_docs, plot, profile, rows}.

    `reference` is the previous accepted snapshot's profile (None on the first run: drift is then
    not checked, and the result says so).
    """
    from onerec.semantic_ids import load_table  # heavy: torch

    calibration_path, checkpoint_dir, report_dir = Path(calibration_path), Path(checkpoint_dir), Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = report_dir / "data_docs"
    table = load_table(checkpoint_dir / "semantic_ids.npy")
    context_len = json.loads((checkpoint_dir / "config.json").read_text())["context_len"]
    raw = _read_raw(calibration_path)
    stats = _profile_stats(checkpoint_dir)
    vocabularies = _vocabularies(checkpoint_dir)

    ctx = _context(docs_dir)
    run_name = f"calibration {calibration_sha256[:12] or calibration_path.name}"
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    requests_result = _run_suite(ctx, "calibration_requests", request_suite(cfg, stats, context_len, vocabularies),
                                 summarise(raw, table, vocabularies), run_name)
    failed = _failures(requests_result)
    if missing:
        failed.insert(0, {"expectation": "required columns", "missing": missing})

    drift: dict = {"checked": False, "reason": "no previous accepted calibration snapshot" if reference is None
                   else "not checked: the request checks failed"}
    profile = None
    if not failed:
        profile = data_profile(raw, calibration_sha256)
        if reference is not None:
            drift_result = _run_suite(ctx, "calibration_drift", drift_suite(cfg, reference), drift_frame(profile, reference),
                                      run_name)
            kl = {r.expectation_config.kwargs["column"]: (r.result or {}).get("observed_value") for r in drift_result.results}
            drift = {"checked": True, "popularity_kl": _jsonable(kl.get("popularity_bucket")),
                     "history_length_kl": _jsonable(kl.get("history_length_bucket")),
                     "category_kl": {c.removeprefix("category__"): _jsonable(v) for c, v in kl.items()
                                     if c.startswith("category__")},
                     "reference_calibration_sha256": reference.get("calibration_sha256", "")}
            failed += _failures(drift_result)
    ctx.build_data_docs()
    make_offline(docs_dir)  # styled with no network, from the run's artifacts too

    passed = not failed
    result = {
        "passed": passed, "rows": int(len(raw)), "failed": failed, "drift": drift,
        "suite_version": SUITE_VERSION, "data_docs": str(docs_dir / "index.html"),
        "statistics": {"expectations": len(requests_result.results), "failed": len(failed)},
    }
    if profile is not None:
        (report_dir / "calibration_profile.json").write_text(json.dumps(profile))
        result["profile"] = str(report_dir / "calibration_profile.json")
    result["plot"] = str(plot_validation(result, profile, reference, report_dir / "calibration_validation.png"))
    (report_dir / "calibration_validation.json").write_text(json.dumps(result, indent=2))
    if passed:
        log.info("calibration data passed %d expectations (drift: %s)", len(requests_result.results), drift)
    else:
        log.error("calibration data FAILED validation:\n%s", failure_summary(result))
    return result


def failure_summary(result: dict) -> str:
    return "\n".join(
        "  - " + ", ".join(f"{k}={v}" for k, v in f.items()) for f in result["failed"]
    ) or "  (none)"


def plot_validation(result: dict, profile: dict | None, reference: dict | None, out: Path) -> Path:
    """PNG: the failed checks (or 'all passed') and, with a reference, both drift distributions."""
    from onerec.plots import pyplot  # heavy: torch

    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    text = "all expectations passed" if result["passed"] else "FAILED:\n" + "\n".join(
        f"{f['expectation']} {f.get('column', '')}: {str(f.get('observed', ''))[:50]}" for f in result["failed"][:12]
    )
    axes[0].axis("off")
    axes[0].text(0, 1, f"calibration validation ({result['rows']} rows)\n\n{text}", va="top", family="monospace",
                 fontsize=8, color="black" if result["passed"] else "darkred")
    if profile is not None and reference is not None:
        frame = drift_frame(profile, reference)
        for ax, col, (_, ref_w), title in (
            (axes[1], "popularity_bucket", popularity_buckets(reference), "item popularity bucket (10 = unseen)"),
            (axes[2], "history_length_bucket", length_buckets(reference), "history length decile"),
        ):
            cur = frame[col].dropna().astype(int)
            cur_w = np.bincount(cur, minlength=len(ref_w)) / max(len(cur), 1)
            x = np.arange(len(ref_w))
            ax.bar(x - 0.2, ref_w, 0.4, label="accepted reference")
            ax.bar(x + 0.2, cur_w, 0.4, label="this snapshot")
            kl = result["drift"].get("popularity_kl" if col == "popularity_bucket" else "history_length_kl")
            ax.set_title(f"{title}\nKL = {kl:.4f}" if isinstance(kl, float) else title)
            ax.legend()
    else:
        for ax in axes[1:]:
            ax.axis("off")
            ax.text(0.5, 0.5, result["drift"].get("reason", "drift not checked"), ha="center")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
