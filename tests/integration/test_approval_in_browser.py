"""An approver's day in the real MLflow UI: headless Chromium (Debian's chromium + chromedriver,
installed by `make`) driven by Selenium against the whole local stack.

The pipeline registers a candidate (approval=pending); the browser signs in as the stack's
approver, opens the version page, reads the review (the description), approves with the clicks
docs/runbook.md documents (the pencil on the `approval` row, value `approved`, Save), and the
approval alone (MLflow webhook -> relay -> Airflow asset event -> onerec_fp8_promote) makes the
local endpoint serve that version; the review's Data Docs open styled in the run's artifact
view. Set ONEREC_SCREENSHOT_DIR to keep the page's screenshots
(docs/images/ holds the committed ones; fixtures/browser.py).
"""

from __future__ import annotations

import contextlib
import json
import time
from urllib.parse import quote

import httpx
import pytest
from fixtures.browser import screenshot, sign_in
from fixtures.stack import airflow_api, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMOTE_DAG = "onerec_fp8_promote"
CONFIG_VARIABLE = "onerec_fp8_config"  # onerec.settings.AIRFLOW_VARIABLE
# thresholds that always pass on 32 users: the quality gate runs for real, its verdict is not under test
PASS_THRESHOLDS = {"max_relative_recall_drop": 10.0, "max_relative_ndcg_drop": 10.0, "min_topk_overlap": 0.0,
                   "max_users": 32}


def promote_runs(http) -> list[dict]:
    return http.get(f"/api/v2/dags/{PROMOTE_DAG}/dagRuns").raise_for_status().json()["dag_runs"]


def promoted_by(http, run: dict):
    """What a promote run's promote task returned (its XCom), None before it has one."""
    path = (f"/api/v2/dags/{PROMOTE_DAG}/dagRuns/{quote(run['dag_run_id'], safe='')}/taskInstances/"
            "promote_newest_approved/xcomEntries/return_value")
    reply = http.get(path, params={"deserialize": "true", "stringify": "false"})
    return reply.json().get("value") if reply.status_code == 200 else None


@contextlib.contextmanager
def airflow_runs_promote_for(state: dict, overrides: dict):
    """The stack's promote DAG active, its tasks configured by the Airflow Variable; both put back after."""
    with airflow_api(state) as http:
        wait_for("the dag-processor to parse onerec_fp8_promote",
                 lambda: http.get(f"/api/v2/dags/{PROMOTE_DAG}").status_code == 200, 240)
        was_paused = http.get(f"/api/v2/dags/{PROMOTE_DAG}").json()["is_paused"]
        http.post("/api/v2/variables", json={"key": CONFIG_VARIABLE, "value": json.dumps(overrides)}).raise_for_status()
        http.patch(f"/api/v2/dags/{PROMOTE_DAG}", json={"is_paused": False}).raise_for_status()
        try:
            # an active DAG starts its latest scheduled run at once: let it end, so that what follows
            # is the approval's own doing
            started = time.monotonic()
            wait_for("the promote DAG's scheduled runs to end", lambda: time.monotonic() - started > 20 and not [
                r for r in promote_runs(http) if r["state"] in ("queued", "running")], 300)
            yield http
        finally:
            http.patch(f"/api/v2/dags/{PROMOTE_DAG}", json={"is_paused": was_paused})
            http.delete(f"/api/v2/variables/{CONFIG_VARIABLE}")


def test_an_approver_approves_in_the_mlflow_ui_and_promote_serves_it(local_stack, trained_tiny, chromium, tmp_path,
                                                                      monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from ops.processes import free_port
    from ops.rollout.local import stop as stop_local_serving
    from ops.stack import stack_env
    from tasks.config import PipelineConfig
    from tasks.publish import publish
    from tasks.registry import client
    from tasks.requantize import run_requantize

    work = tmp_path / "work"
    overrides = {"model_name": "onerec-test-browser", "s3_prefix": "test-browser", "state_dir": str(work),
                 "local_serve_port": free_port(), "latency_gate_blocking": False,
                 "quality_gate": PASS_THRESHOLDS, "quality_eval_requests": 64}
    env = stack_env(local_stack)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = PipelineConfig.from_env(env, overrides)
    publish(cfg, str(trained_tiny.checkpoint_dir), str(trained_tiny.calibration_path), "2026-01-01",
            "20260101T000000Z")
    version = run_requantize(cfg)["version"]
    assert version is not None
    c = client(cfg)

    mlflow_url = local_stack["services"]["mlflow"]["url"]
    approver = local_stack["credentials"]["mlflow"]["approver"]
    try:
        with airflow_runs_promote_for(local_stack, overrides) as airflow:
            driver = chromium
            sign_in(driver, approver["username"], approver["password"])
            driver.get(f"{mlflow_url}/#/models/{cfg.model_name}/versions/{version}")
            wait = WebDriverWait(driver, 60)
            row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr[data-row-key='approval']")))
            assert "pending" in row.text

            # the review: the gate summary is the page's description
            review = driver.find_element(By.CSS_SELECTOR, "[data-testid='note-editor-preview-content']").text
            assert "Quality: PASSED" in review and "Latency: NOT MEASURED" in review
            screenshot(driver, tmp_path, "mlflow-version-review.png")

            # the documented approval: the pencil on the approval row, value `approved`, Save
            row.find_element(By.CSS_SELECTOR, "[data-testid='editable-table-button-edit']").click()
            field = wait.until(ec.element_to_be_clickable(
                (By.CSS_SELECTOR, "tr[data-row-key='approval'] [data-testid='editable-table-edited-input']")))
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys("approved")
            driver.find_element(By.CSS_SELECTOR, "[data-testid='editable-table-button-save']").click()
            wait_for("the approval to reach the registry",
                     lambda: c.get_model_version(cfg.model_name, version).tags.get("approval") == "approved", 60)
            driver.refresh()
            row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr[data-row-key='approval_by']")))
            assert "approver" in row.text
            screenshot(driver, tmp_path, "mlflow-version-approved.png")

            # nothing else happens: the approval's asset event starts a promote run, which rolls the version out
            def asset_triggered_runs_that_ended():
                runs = [r for r in promote_runs(airflow) if r["run_type"] == "asset_triggered"]
                return [r for r in runs if r["state"] in ("success", "failed")] if runs else None

            [run] = wait_for("the asset-triggered promote run", asset_triggered_runs_that_ended, 600, every_s=5)
            assert run["state"] == "success", run
            assert promoted_by(airflow, run)["promoted"] == version
            assert _alias(c, cfg.model_name, "champion") == version

            # the review's Data Docs link: the run's artifact view shows the page styled, its tables
            # built, with nothing loaded from the network (tasks.data_docs)
            data_docs_opens_styled_in_the_run_artifacts(driver, c, cfg, version, tmp_path)
        served = httpx.post(f"http://127.0.0.1:{overrides['local_serve_port']}/v1/recommend",
                            json={"users": [{"history": [1, 2, 3]}], "k": 3}, timeout=60, trust_env=False)
        assert served.status_code == 200, served.text
        assert served.json()["model"]["version"] == version
    finally:
        stop_local_serving(state_dir=work)


def _alias(c, name: str, alias: str) -> str | None:
    from tasks.promote import alias_version

    return alias_version(c, name, alias)


def data_docs_opens_styled_in_the_run_artifacts(driver, c, cfg, version: str, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tasks.review_page import run_url

    run = c.get_run(c.get_model_version(cfg.model_name, version).run_id)
    driver.get(f"{run_url(cfg.tracking_uri(), run.info.experiment_id, run.info.run_id)}"
               "/artifacts/reports/validation/data_docs/index.html")
    wait = WebDriverWait(driver, 60)
    wait.until(ec.frame_to_be_available_and_switch_to_it((By.CSS_SELECTOR, "iframe.mlflow-html-iframe")))
    try:
        cell = wait.until(lambda d: [td for td in d.find_elements(By.CSS_SELECTOR, "table td")
                                     if td.text.strip() == "calibration_requests"])[0]
        assert cell.value_of_css_property("border-top-style") == "solid"  # the inline stylesheet applies
        assert driver.execute_script("return document.querySelectorAll('link[href^=\"http\"], "
                                     "script[src^=\"http\"]').length") == 0
    finally:
        driver.switch_to.default_content()
    screenshot(driver, tmp_path, "mlflow-data-docs.png")
