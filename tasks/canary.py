"""The canary of a promotion: the approved version takes a growing share of traffic beside the
champion, and each step is judged before the next one.

Steps and thresholds: PipelineConfig.canary (ops.rollout.canary.CanaryConfig). At each step the
serving proxy (ops/rollout/proxy.py) sends that share of the recommendation requests to the
candidate, mirrors the champion's share to it, and keeps the evidence (ops/rollout/canary.py):

- live metrics, candidate against the champion of the same step (at 100% the champion answers
  nothing, so against the champion of the step before): error rate, p99 latency, empty results
  (the share of users answered with no item);
- mirrored requests (below 100%): the candidate's answers against the champion's, top-k overlap
  and top-1 score shift.

A step passes when every figure is within its threshold; one that fails, or that did not see
enough traffic by its timeout (inconclusive), rolls back at once: all traffic to the champion,
the candidate's server stops, the version's state record becomes rolled_back (terminal), its tags
say why (`canary`, `canary_reason`) and on-call is notified (tasks.notify). Every step's figures
and verdict are the version tags canary_step_<n> (JSON), the whole walk reports/canary.json and
reports/canary.png on the version's registering run (tag `canary_report`). A walk that passes
leaves the candidate serving everything; promote then moves the aliases.

The walk runs on the local target (its proxy). With the helm target and the chart's canary
(values canary.enabled) the chart's Argo Rollouts Rollout walks its steps, judged by its
AnalysisTemplate in Prometheus (helm/onerec-serving, canary.* values), after `helm upgrade`
returns; `judge_rollout` waits for that verdict (ops/rollout/argo.py, at most
CanaryConfig.rollout_timeout_s): Healthy passes, aborted, Degraded or no verdict in time rolls
back with `helm rollback` and is recorded, reported and notified exactly as a failed local step
(one step, `rollout`, with Argo's message as the reason); the report holds the measurements of
the canary pods' AnalysisRuns and draws them (plot_rollout_analysis).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path

from ops import rollout as rollout_api
from ops.rollout import RolloutError, argo, helm, local
from tasks.approval import transition
from tasks.errors import StepFailed
from tasks.notify import send_failure
from tasks.registry import now_iso

log = logging.getLogger(__name__)

STEP_TAG, VERDICT_TAG, REASON_TAG, REPORT_TAG = "canary_step_{}", "canary", "canary_reason", "canary_report"


def judge(policy, weight: int, evidence: dict, baseline: dict | None) -> tuple[str, list[str]]:
    """(verdict, reasons) of one step: passed | failed | inconclusive. `baseline` is the champion's
    arm of this step, or of the step before when the champion answered nothing in this one."""
    candidate, mirror = evidence["canary"], evidence["mirror"]
    if candidate["requests"] < policy.min_requests:
        return "inconclusive", [f"the candidate answered {candidate['requests']} requests "
                                f"(needs {policy.min_requests})"]
    if weight < 100 and mirror["compared"] < policy.min_mirrored:
        return "inconclusive", [f"{mirror['compared']} mirrored requests compared (needs {policy.min_mirrored})"]
    reasons = []
    champion = baseline if baseline and baseline["requests"] else None
    champion_errors = champion["error_rate"] if champion else 0.0
    if candidate["error_rate"] - champion_errors > policy.max_error_rate_increase:
        reasons.append(f"error rate {candidate['error_rate']:.3f} vs champion {champion_errors:.3f} "
                       f"(max increase {policy.max_error_rate_increase})")
    # share of users answered with no item; None when no user was answered (all errors: judged above)
    empty, champion_empty = candidate["empty_rate"] or 0.0, (champion["empty_rate"] if champion else None) or 0.0
    if empty - champion_empty > policy.max_empty_rate_increase:
        reasons.append(f"empty results {empty:.3f} of users vs champion {champion_empty:.3f} "
                       f"(max increase {policy.max_empty_rate_increase})")
    if champion and champion["p99_s"] and candidate["p99_s"] is not None:
        slower = candidate["p99_s"] - champion["p99_s"]
        if candidate["p99_s"] > policy.max_p99_ratio * champion["p99_s"] and slower > policy.min_p99_increase_s:
            reasons.append(f"p99 latency {candidate['p99_s'] * 1e3:.0f} ms vs champion {champion['p99_s'] * 1e3:.0f} ms "
                           f"(max ratio {policy.max_p99_ratio})")
    if weight < 100 and mirror["failed"] > policy.max_error_rate_increase * max(1, mirror["compared"] + mirror["failed"]):
        reasons.append(f"{mirror['failed']} mirrored requests failed on the candidate")
    if weight < 100 and mirror["overlap_mean"] is not None and mirror["overlap_mean"] < policy.min_topk_overlap:
        reasons.append(f"top-k overlap with the champion {mirror['overlap_mean']:.2f} (min {policy.min_topk_overlap})")
    if weight < 100 and mirror["score_shift_mean"] is not None and mirror["score_shift_mean"] > policy.max_score_shift:
        reasons.append(f"top-1 score shift {mirror['score_shift_mean']:.3f} (max {policy.max_score_shift})")
    return ("failed" if reasons else "passed"), reasons


def _hold(cfg, weight: int) -> dict:
    """Wait out one step: its hold time and enough traffic, or its timeout; the proxy's evidence."""
    policy = cfg.canary
    started = time.monotonic()
    while True:
        time.sleep(policy.poll_s)
        evidence = local.canary_status(cfg)
        if evidence is None:
            raise RolloutError("the canary disappeared from the local endpoint (proxy restarted?)")
        elapsed = time.monotonic() - started
        enough = evidence["canary"]["requests"] >= policy.min_requests and (
            weight == 100 or evidence["mirror"]["compared"] >= policy.min_mirrored)
        if (elapsed >= policy.hold_s and enough) or elapsed >= policy.step_timeout_s:
            return evidence


def walk(cfg, c, version: str, model_uri: str, digest: str | None, champion: str) -> dict:
    """Walk `version` through the canary steps beside `champion` (module doc); the rollout result
    when it passed, StepFailed (after rolling back and notifying) when a step did not."""
    policy, name = cfg.canary, cfg.model_name
    steps: list[dict] = []
    c.set_model_version_tag(name, version, VERDICT_TAG, "running")
    verdict, reasons, baseline = "failed", ["the canary did not start"], None
    try:
        for n, weight in enumerate(policy.weights, 1):
            if n == 1:
                local.canary_start(cfg, model_uri, version, weight, digest=digest)
            else:
                local.canary_weight(cfg, weight)
            log.info("canary step %d/%d: version %s takes %d%% of the traffic beside champion %s",
                     n, len(policy.weights), version, weight, champion)
            evidence = _hold(cfg, weight)
            if evidence["stable"]["requests"]:
                baseline = evidence["stable"]
            verdict, reasons = judge(policy, weight, evidence, baseline)
            step = {"step": n, "weight": weight, "verdict": verdict, "reasons": reasons, "at": now_iso(),
                    "seconds": round(evidence["seconds"], 1), "stable": evidence["stable"],
                    "canary": evidence["canary"], "mirror": evidence["mirror"]}
            steps.append(step)
            c.set_model_version_tag(name, version, STEP_TAG.format(n), json.dumps(step, sort_keys=True)[:5000])
            log.info("canary step %d (%d%%): %s%s", n, weight, verdict, f": {'; '.join(reasons)}" if reasons else "")
            if verdict != "passed":
                break
    except BaseException as exc:
        verdict, reasons = "failed", [f"the canary stopped: {exc}"]
        raise
    finally:
        if verdict != "passed":
            _roll_back(cfg, c, version, champion, steps, verdict, reasons)
    rollout = local.canary_end(cfg, promote=True)
    c.set_model_version_tag(name, version, VERDICT_TAG, "passed")
    _report(cfg, c, version, champion, steps, "passed")
    log.info("canary of version %s passed %d steps: it serves all traffic", version, len(steps))
    return {**rollout, "canary": {"verdict": "passed", "steps": steps}}


def judge_rollout(cfg, c, version: str, model_uri: str, digest: str | None, champion: str, api=None) -> dict:
    """Helm target with the chart's canary: `helm upgrade`, then the Argo Rollout's verdict (module
    doc); the rollout result when it is Healthy, StepFailed (after `helm rollback`, marking and
    notifying) otherwise. `api`: the Kubernetes custom-objects API (default: from cfg)."""
    name, namespace, rollout_name = cfg.model_name, cfg.helm_namespace, helm.fullname(cfg.helm_release)
    api = api if api is not None else argo.rollouts_api(cfg)
    before = argo.current_pod_hash(api, namespace, rollout_name)  # the verdict must be about the new pods
    rollout = rollout_api.deploy(cfg, model_uri, version, digest=digest)  # a failed upgrade undid itself: raise
    c.set_model_version_tag(name, version, VERDICT_TAG, "running")
    log.info("helm revision %s of %s: waiting up to %.0f s for the Rollout %s/%s (champion %s serves the rest)",
             rollout.get("revision"), version, cfg.canary.rollout_timeout_s, namespace, rollout_name, champion)
    try:
        argo_verdict = argo.wait_for_verdict(api, namespace, rollout_name, cfg.canary.rollout_timeout_s,
                                             cfg.canary.poll_s, previous_hash=before)
    except BaseException as exc:  # interrupted: what serves is undecided, so back to the champion
        argo_verdict = {"verdict": "interrupted", "message": f"the wait stopped: {exc}", "seconds": None}
    verdict = {"healthy": "passed", "timeout": "inconclusive"}.get(argo_verdict["verdict"], "failed")
    step = {"step": 1, "weight": 100, "verdict": verdict, "reasons": [] if verdict == "passed" else [argo_verdict["message"]],
            "at": now_iso(), "seconds": argo_verdict["seconds"], "rollout": f"{namespace}/{rollout_name}",
            "argo": argo_verdict["verdict"], "helm_revision": rollout.get("revision")}
    c.set_model_version_tag(name, version, STEP_TAG.format(1), json.dumps(step, sort_keys=True)[:5000])
    analysis = _rollout_analysis(api, namespace, argo_verdict.get("pod_hash"), before)
    if verdict != "passed":
        _roll_back(cfg, c, version, champion, [step], verdict, step["reasons"], undo=lambda: rollout_api.rollback(cfg),
                   where=f"the Rollout {namespace}/{rollout_name}", analysis=analysis)
    c.set_model_version_tag(name, version, VERDICT_TAG, "passed")
    _report(cfg, c, version, champion, [step], "passed", analysis)
    log.info("the Rollout of version %s is healthy: it serves all traffic", version)
    return {**rollout, "canary": {"verdict": "passed", "steps": [step]}}


def _rollout_analysis(api, namespace: str, pod_hash: str | None, before: str | None) -> list[dict] | None:
    """The figures of the Argo analysis of the new pods (argo.analysis_of), None when there are none
    to read: the new pods never showed up, or the API did not answer (the verdict stands either way)."""
    if not pod_hash or pod_hash == before:
        return None
    try:
        return argo.analysis_of(api, namespace, pod_hash) or None
    except Exception as exc:
        log.warning("could not read the AnalysisRuns of pods %s in %s: %s", pod_hash, namespace, exc)
        return None


def _roll_back(cfg, c, version: str, champion: str, steps: list[dict], verdict: str, reasons: list[str],
               undo=None, where: str | None = None, analysis: list[dict] | None = None) -> None:
    """All traffic back to the champion, the candidate stopped and marked, on-call told; then raise.
    `undo` (helm: its rollback) replaces ending the local canary; if it fails, the reason says so."""
    name = cfg.model_name
    where = where or (f"step {len(steps)} ({steps[-1]['weight']}%)" if steps else "its start")
    serving = f"champion {champion} serves all traffic again, unchanged"
    if undo is None:
        with contextlib.suppress(RolloutError):  # nothing to end when the canary never started
            local.canary_end(cfg, promote=False)
    else:
        try:
            undo()
        except RolloutError as exc:
            reasons = [*reasons, f"the rollback failed too ({exc})"]
            serving = "the rollback FAILED: check what serves"
    reason = f"canary {verdict} at {where}: {'; '.join(reasons)}"
    c.set_model_version_tag(name, version, VERDICT_TAG, verdict)
    c.set_model_version_tag(name, version, REASON_TAG, reason[:5000])
    transition(cfg, c, version, "rolled_back", by="canary", note=reason)
    report = _report(cfg, c, version, champion, steps, verdict, analysis)
    subject = f"[onerec-fp8] canary of {name} version {version} rolled back: {reason}"[:200]
    body = "\n".join([
        f"Model:    {name} version {version} ({serving})",
        f"Verdict:  {verdict} at {where}",
        *[f"Reason:   {r}" for r in reasons],
        f"Steps:    {json.dumps([{k: s[k] for k in ('step', 'weight', 'verdict')} for s in steps])}",
        f"Report:   {report}",
        "",
        "Runbook: docs/runbook.md (Canary).",
    ])
    send_failure(subject, body, cfg)
    log.error("%s version %s: %s; %s", name, version, reason, serving)
    raise StepFailed(f"{name} version {version}: {reason}; rolled back, {serving}")


def _report(cfg, c, version: str, champion: str, steps: list[dict], verdict: str,
            analysis: list[dict] | None = None) -> str:
    """reports/canary.json and reports/canary.png on the version's registering run; the tag
    canary_report names them. The picture: the proxy's figures per step (local), or the Argo
    analysis's measurements (`analysis`, helm); an Argo verdict without readable AnalysisRuns has
    canary.json only. Best effort: a report that cannot be stored is logged, never hides the verdict."""
    name = cfg.model_name
    run_id = c.get_model_version(name, version).run_id
    report = {"model": name, "version": version, "champion": champion, "verdict": verdict, "steps": steps,
              "policy": {k: getattr(cfg.canary, k) for k in cfg.canary.__dataclass_fields__}}
    if analysis is not None:
        report["analysis"] = analysis
    try:
        with tempfile.TemporaryDirectory(prefix="onerec-canary-") as tmp:
            (Path(tmp) / "canary.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=list) + "\n")
            files = ["canary.json"]
            if all("canary" in s for s in steps):  # the proxy's figures per step
                files.append(plot_canary(report, Path(tmp) / "canary.png").name)
            elif analysis:
                files.append(plot_rollout_analysis(report, Path(tmp) / "canary.png").name)
            for file in files:
                c.log_artifact(run_id, str(Path(tmp) / file), "reports")
    except Exception as exc:  # the artifact store is down: the tags still say everything
        log.error("could not store the canary report of version %s: %s", version, exc)
        return f"not stored ({exc})"
    where = f"runs:/{run_id}/reports/{files[-1]}"
    c.set_model_version_tag(name, version, REPORT_TAG, where)
    return where


def plot_canary(report: dict, path: Path) -> Path:
    """The walk as a picture: per step the share, the live figures of both arms and the mirrored
    comparison, thresholds dashed, each step's verdict and its evidence (requests compared)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, policy = report["steps"], report["policy"]
    x = list(range(1, len(steps) + 1))
    labels = [f"{s['weight']}%\n{s['verdict']}" for s in steps]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))

    def panel(ax, title, arms, threshold=None):
        for label, values, style in arms:
            ax.plot(x, [float("nan") if v is None else v for v in values], style, label=label)
        if threshold is not None:
            ax.axhline(threshold[1], color="red", linestyle="--", linewidth=1, label=threshold[0])
        ax.set_ylim(bottom=0)  # every figure is >= 0
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, labels, fontsize=8)
        ax.legend(fontsize=7)

    get = lambda arm, key: [s[arm][key] for s in steps]
    panel(axes[0], "error rate", [("champion", get("stable", "error_rate"), "o-"),
                                  ("candidate", get("canary", "error_rate"), "s-")])
    panel(axes[1], "p99 latency (s)", [("champion", get("stable", "p99_s"), "o-"),
                                       ("candidate", get("canary", "p99_s"), "s-")])
    panel(axes[2], "mirrored: top-k overlap", [("mean", get("mirror", "overlap_mean"), "o-"),
                                                ("min", get("mirror", "overlap_min"), "x:")],
          ("min allowed", policy["min_topk_overlap"]))
    panel(axes[3], "mirrored: top-1 score shift", [("mean", get("mirror", "score_shift_mean"), "o-"),
                                                    ("max", get("mirror", "score_shift_max"), "x:")],
          ("max allowed", policy["max_score_shift"]))
    for ax, counts in ((axes[0], "canary"), (axes[1], "canary"), (axes[2], "mirror"), (axes[3], "mirror")):
        for xi, s in zip(x, steps, strict=True):
            n = s[counts]["requests" if counts == "canary" else "compared"]
            ax.annotate(f"n={n}", (xi, 0), textcoords="offset points", xytext=(0, 4), fontsize=7, ha="center",
                        xycoords=("data", "axes fraction"))
    return _save(fig, path, f"canary of {report['model']} version {report['version']} beside champion "
                            f"{report['champion']}: {report['verdict']} (n = candidate requests / mirrored requests "
                            "compared per step)")


def _save(fig, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


PHASE_COLOURS = {"Successful": "tab:green", "Failed": "tab:red", "Inconclusive": "tab:orange", "Error": "tab:gray"}


def plot_rollout_analysis(report: dict, path: Path) -> Path:
    """The Argo analysis behind a helm canary's verdict: per metric its measurements in order,
    coloured by phase, the successCondition's limit dashed, and how many measurements passed (no
    traffic in a window: no point, counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = report["analysis"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        points = metric["measurements"]
        for phase, colour in PHASE_COLOURS.items():
            shown = [(i, m["value"]) for i, m in enumerate(points, 1) if m["phase"] == phase and m["value"] is not None]
            if shown:
                ax.plot(*zip(*shown, strict=True), "o", color=colour, label=phase)
        if metric["limit"] is not None:
            ax.axhline(metric["limit"][1], color="red", linestyle="--", linewidth=1, label=f"{metric['limit'][0]} limit")
        empty = sum(m["value"] is None for m in points)
        ax.set_title(f"{metric['name']}: {metric['phase']}\n{metric['successful']} of {metric['count']} passed"
                     + (f", {empty} without traffic" if empty else ""), fontsize=9)
        ax.set_xlabel("measurement", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)  # rates, seconds and shares are >= 0
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path, f"Argo Rollout of {report['model']} version {report['version']} beside champion "
                            f"{report['champion']}: {report['verdict']} (the canary pods' background analysis)")
