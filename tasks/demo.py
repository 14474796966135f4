"""The end-to-end demo (`make demo`, after `onerec-fp8 stack up`): `python -m tasks.demo`.

On a CPU-only machine, against the local stack (S3, MLflow, Airflow):
  1. synthetic data and a trained `tiny` checkpoint (reused when present in <state_dir>/demo/)
  2. `publish` the checkpoint (manifest last) and calibration data to the local S3
  3. onerec_fp8_requantize through real Airflow (`airflow dags test` with the stack's AIRFLOW_HOME)
  4. approve the challenger with the same REST call the MLflow UI makes (in production a person
     does this in the UI after reading the reports)
  5. onerec_fp8_promote through real Airflow: the local serving process now serves the champion
  6. a recommendation request to the serving endpoint, and the URLs to look at everything
A second run reuses everything: nothing is uploaded, quantized or registered twice.
The local stack's gate policy (its env, printed by `stack up`): "no FP8 GPU to measure latency" does
not block (latency_gate_blocking=false); the version is labelled gates=passed-latency-unmeasured.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from onerec.calibration_table import context_len_of, draw_calibration_table, write_calibration_table
from onerec.errors import UserError
from onerec.manifest import verify_manifest
from ops import rollout
from ops.rollout import local
from ops.stack import airflow_home, read_state, stack_env
from tasks.config import PipelineConfig
from tasks.provenance import verify_version
from tasks.publish import publish
from tasks.registry import client, find_versions

log = logging.getLogger("onerec.demo")

REPO_ROOT = Path(__file__).resolve().parent.parent
CALIBRATION_REQUESTS = 2048  # half calibrates, half is the quality gate's held-out set
TRAIN_EPOCHS = 3


def _step(n: int, total: int, text: str) -> float:
    print(f"[demo {n}/{total}] {text}", file=sys.stderr, flush=True)
    return time.monotonic()


def _done(t0: float, text: str = "done") -> None:
    print(f"           {text} ({time.monotonic() - t0:.0f}s)", file=sys.stderr, flush=True)


# --- Airflow: run a DAG for real, in the stack's Airflow installation --------------------------------


def airflow_env(state: dict, extra: dict | None = None) -> dict[str, str]:
    """Environment for the Airflow CLI on the local stack: its AIRFLOW_HOME, dags/ and contract env."""
    return {
        **os.environ, **stack_env(state),
        "AIRFLOW_HOME": str(airflow_home(state["state_dir"])),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API__BASE_URL": state["services"]["airflow"]["url"],  # links in failure mails
        **(extra or {}),
    }


def dags_test(dag_id: str, state: dict, log_path: str | Path, extra_env: dict | None = None,
              conf: dict | None = None, timeout_s: float = 900) -> dict:
    """`airflow dags test DAG_ID` against the stack; returns {state, seconds, log}. Full log in log_path."""
    cmd = [sys.executable, "-m", "airflow", "dags", "test", dag_id]
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout_s,
                              env=airflow_env(state, extra_env), cwd=state["state_dir"])
    text = log_path.read_text(errors="replace")
    finished = [line for line in text.splitlines() if "DagRun Finished" in line]
    run_state = "success" if finished and "state=success" in finished[-1] else "failed"
    if proc.returncode != 0:
        run_state = "failed"
    return {"dag_id": dag_id, "state": run_state, "returncode": proc.returncode,
            "seconds": round(time.monotonic() - t0, 1), "log": str(log_path)}


# --- the demo -----------------------------------------------------------------------------------------


def prepare_checkpoint(demo_dir: Path) -> dict:
    """Synthetic data, a trained tiny checkpoint and a calibration table; each reused when present."""
    data_dir, ckpt_dir, calibration = demo_dir / "data", demo_dir / "checkpoint", demo_dir / "calibration.parquet"
    reused = []
    if (data_dir / "interactions.parquet").is_file():
        reused.append("data")
    else:
        from onerec.synth import synthesize  # heavy: torch

        synthesize(data_dir, seed=0, overwrite=True)
    try:
        verify_manifest(ckpt_dir)
        reused.append("checkpoint")
    except UserError:
        from onerec.train import train  # heavy: torch

        train(data_dir, "tiny", ckpt_dir, epochs=TRAIN_EPOCHS, seed=0, overwrite=True, progress=True)
    if calibration.is_file():
        reused.append("calibration")
    else:
        table = draw_calibration_table(data_dir, context_len_of(ckpt_dir), CALIBRATION_REQUESTS, seed=0)
        write_calibration_table(table, calibration, overwrite=True)
    return {"data": str(data_dir), "checkpoint": str(ckpt_dir), "calibration": str(calibration), "reused": reused}


PROMOTE_WAIT_S = 240.0  # the approval's webhook -> relay -> asset event -> promote run (about 20 s locally)


def _became_champion(c, name: str, version: str, timeout_s: float) -> bool:
    """Whether `version` is the champion within `timeout_s` (polled every 2 s)."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if str(c.get_model_version_by_alias(name, "champion").version) == str(version):
                return True
        except MlflowException:  # no champion yet
            pass
        time.sleep(2)
    return False


def approve_as_the_ui_does(tracking_uri: str, name: str, version: str, auth: tuple[str, str],
                           value: str = "approved"):
    """The exact call the MLflow UI makes when an approver (signed in as `auth`) adds the tag approval=approved.

    Returns the HTTP response (403 for an account that is not an approver).
    """
    import httpx  # heavy: httpx, only where HTTP is spoken

    return httpx.post(f"{tracking_uri}/ajax-api/2.0/mlflow/model-versions/set-tag",
                      json={"name": name, "version": str(version), "key": "approval", "value": value},
                      auth=auth, timeout=30, trust_env=False)


def run_demo(env: dict[str, str]) -> dict:
    """The demo against the stack of `env`'s state dir (main passes this process's environment)."""
    total = 7
    # UserError "run `onerec-fp8 stack up` first" when there is no stack
    state = read_state(PipelineConfig.from_env(env).state_dir)
    cfg = PipelineConfig.from_env({**env, **stack_env(state)})
    demo_dir = Path(cfg.state_dir) / "demo"
    urls = {name: svc["url"] for name, svc in state["services"].items()}
    missing = {"s3", "mlflow", "airflow"} - set(urls)
    if missing:
        raise UserError(f"the local stack lacks {sorted(missing)}: run `onerec-fp8 stack up`")

    t = _step(1, total, "synthetic data + a trained `tiny` checkpoint (reused when present)")
    prepared = prepare_checkpoint(demo_dir)
    _done(t, f"reused: {prepared['reused'] or 'nothing'}")

    t = _step(2, total, f"publish the checkpoint (files, then manifest.json last) and calibration data to {cfg.s3_root}")
    published = publish(cfg, prepared["checkpoint"], prepared["calibration"], date="2026-01-01")
    _done(t, f"{published['checkpoint_uri']} ({'uploaded' if published['uploaded'] else 'already published'})")

    t = _step(3, total, "run onerec_fp8_requantize through Airflow (airflow dags test): "
                        "verify -> Great Expectations -> FP8 -> gates -> MLflow")
    run = dags_test("onerec_fp8_requantize", state, demo_dir / "logs" / "onerec_fp8_requantize.log")
    if run["state"] != "success":
        raise UserError(f"onerec_fp8_requantize failed; see {run['log']}")
    c = client(cfg)
    versions = find_versions(cfg, c, checkpoint_sha256=published["checkpoint_sha256"], recipe=cfg.recipe)
    if not versions:
        raise UserError(f"no model version for checkpoint {published['checkpoint_sha256'][:12]}: the gates failed "
                        f"(reports in the MLflow run; log {run['log']})")
    version = c.get_model_version(cfg.model_name, versions[0].version)  # search results carry no aliases
    _done(t, f"{cfg.model_name} version {version.version}: gates={version.tags.get('gates')}, "
             f"approval={version.tags.get('approval')}, aliases={list(version.aliases)}")

    mlflow_url = urls["mlflow"]
    version_url = f"{mlflow_url}/#/models/{cfg.model_name}/versions/{version.version}"
    t = _step(4, total, "approve the challenger")
    if version.tags.get("approval") == "pending":
        print("           In production a PERSON does this: open the version in the MLflow UI,\n"
              f"           {version_url}\n"
              "           read the review and the reports, then in the Tags table click the pencil on\n"
              "           `approval`, replace pending by approved and Save, signed in as an approver\n"
              "           (docs/runbook.md; tests/integration/test_approval_in_browser.py clicks through\n"
              "           it in Chromium). The demo makes the same REST call\n"
              "           the UI makes, as the stack's approver account:\n"
              "           POST /ajax-api/2.0/mlflow/model-versions/set-tag {key: approval, value: approved}",
              file=sys.stderr)
        approver = state["credentials"]["mlflow"]["approver"]
        approve_as_the_ui_does(mlflow_url, cfg.model_name, version.version,
                               (approver["username"], approver["password"])).raise_for_status()
        _done(t, "approval=approved")
    else:
        _done(t, f"already decided: approval={version.tags.get('approval')}")

    t = _step(5, total, "onerec_fp8_promote in Airflow, started by the approval event: roll out, move the aliases")
    if not _became_champion(c, cfg.model_name, version.version, PROMOTE_WAIT_S):
        # no event-started run finished in time (DAGs paused, relay down): run the DAG here
        print(f"           no promote run started by the approval in {PROMOTE_WAIT_S:.0f} s: running it", file=sys.stderr)
        run = dags_test("onerec_fp8_promote", state, demo_dir / "logs" / "onerec_fp8_promote.log")
        if run["state"] != "success":
            raise UserError(f"onerec_fp8_promote failed; see {run['log']}")
    champion = c.get_model_version_by_alias(cfg.model_name, "champion")
    _done(t, f"champion = version {champion.version} (deployed_at {champion.tags.get('deployed_at')})")

    t = _step(6, total, "ask the local serving process for recommendations")
    ensure_serving(cfg, champion.version)
    answer = ask_serving(cfg, prepared["calibration"])
    served = answer["model"]
    _done(t, f"served by {served.get('name')} version {served.get('version')} ({served.get('kind')}): "
             f"top items {answer['users'][0]['items'][:5]}")
    if str(served.get("version")) != str(champion.version):
        raise UserError(f"the endpoint serves version {served.get('version')}, the champion is {champion.version}")

    _step(7, total, "where to look")
    airflow_url = urls["airflow"]
    creds = state.get("credentials", {}).get("airflow", {})
    approver = state["credentials"]["mlflow"]["approver"]
    print(f"  MLflow (runs, reports, registry): {mlflow_url}/#/models/{cfg.model_name}  (approver login: user "
          f"{approver['username']}, password in {approver['file']})\n"
          f"  the champion version:            {mlflow_url}/#/models/{cfg.model_name}/versions/{champion.version}\n"
          f"  Airflow (DAGs, runs, rollback):   {airflow_url}  (user {creds.get('username', 'admin')}, "
          f"password in {creds.get('passwords_file', 'the stack state dir')})\n"
          f"  serving endpoint:                 {answer['url']}/v1/recommend\n"
          "  runbook: docs/runbook.md ; stop everything (stack and local serving): `.venv/bin/onerec-fp8 stack down`",
          file=sys.stderr)
    return {"champion": champion.version, "model": cfg.model_name, "served_version": served.get("version"),
            "mlflow": mlflow_url, "airflow": airflow_url, "serving": answer["url"]}


def ensure_serving(cfg, version: str) -> None:
    """After a restart of the machine or the stack the champion is deployed but no longer running: restart it."""
    if cfg.rollout_target != "local":
        return
    current = local.status(cfg.state_dir).get("current") or {}
    if not (current.get("alive") and str(current.get("version")) == str(version)):
        print(f"           the local serving process is not running version {version}: starting it again",
              file=sys.stderr)
        c = client(cfg)
        digest = verify_version(cfg, c, c.get_model_version(cfg.model_name, version))["evidence"]["version_sha256"]
        rollout.deploy(cfg, f"models:/{cfg.model_name}/{version}", version, digest=digest)


def ask_serving(cfg, calibration_path: str) -> dict:
    """One recommendation request (a real user history from the calibration table) to the local endpoint."""
    import httpx  # heavy: httpx, only where HTTP is spoken
    import pandas as pd  # heavy: pandas

    url = local.status(cfg.state_dir)["url"]
    row = pd.read_parquet(calibration_path).iloc[0]
    profile = {k: float(v) for k, v in row.items() if k not in ("user_id", "history", "target")}
    body = {"users": [{"history": [int(i) for i in row["history"]], "profile": profile}], "k": 10}
    response = httpx.post(f"{url}/v1/recommend", json=body, timeout=60)
    response.raise_for_status()
    return {**response.json(), "url": url}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    try:
        result = run_demo(dict(os.environ))  # the entry point: its environment is the configuration
    except UserError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    print(f"[demo] finished in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
