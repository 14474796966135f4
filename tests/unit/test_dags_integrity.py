"""DAG integrity: every file in dags/ imports cleanly (as Airflow's DagBag sees it), each DAG has tags
and retries in default_args, a dagrun_timeout, the on-call failure notifier and an execution_timeout
on every task, the pipeline's DAGs exist, and no DAG file imports heavy libraries at module top
(the scheduler and dag-processor import DAG files over and over).

Each file is imported in a fresh subprocess with a throwaway AIRFLOW_HOME, so nothing imported by
this test process or by another DAG file can hide a heavy import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
REQUIRED_DAG_IDS = {"onerec_fp8_requantize", "onerec_fp8_promote", "onerec_fp8_rollback"}
HEAVY = ("torch", "mlflow", "great_expectations", "boto3", "pandas")

# Runs in the subprocess: import the file alone, note heavy modules, then let a DagBag parse it.
PROBE = r"""
import importlib.util, json, sys, traceback
heavy = %(heavy)r
import airflow.sdk  # noqa: F401  (what any DAG file imports anyway: the baseline)
baseline = sorted(m for m in heavy if m in sys.modules)
culprits = {}

class WhoImports:
    # Notes the DAG file's line that led to each heavy module's first import.
    def find_spec(self, name, path=None, target=None):
        if name in heavy and name not in culprits:
            lines = [f"{f.lineno}: {f.line}" for f in traceback.extract_stack() if f.filename == sys.argv[1]]
            culprits[name] = lines[-1] if lines else "?"
        return None

sys.meta_path.insert(0, WhoImports())
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.meta_path.pop(0)
after_import = sorted(m for m in heavy if m in sys.modules)
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1], safe_mode=False)
dags = {
    dag_id: {"tags": sorted(dag.tags or []), "default_args": {k: repr(v) for k, v in (dag.default_args or {}).items()},
             "dagrun_timeout": repr(dag.dagrun_timeout), "on_failure": repr(dag.on_failure_callback),
             "tasks": {t.task_id: repr(t.execution_timeout) for t in dag.tasks},
             "params": {k: {**dict(p.schema), "description": p.description} for k, p in dag.params.items()}}
    for dag_id, dag in bag.dags.items()
}
print(json.dumps({"baseline": baseline, "after_import": after_import, "culprits": culprits, "dags": dags,
                  "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}}))
"""


def dag_files() -> list[Path]:
    return sorted(p for p in DAGS.glob("*.py") if p.name != "__init__.py")


def probe(path: Path, airflow_home: Path, probe_script: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(airflow_home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
               # Airflow puts the dags folder on sys.path when it parses or runs DAGs: mirror that.
               PYTHONPATH=os.pathsep.join([str(DAGS), str(REPO)]))
    result = subprocess.run([sys.executable, str(probe_script), str(path)], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=300, stdin=subprocess.DEVNULL)
    report = {"file": path.name, "returncode": result.returncode, "stderr": result.stderr[-3000:]}
    if result.returncode == 0:
        report.update(json.loads(result.stdout.strip().splitlines()[-1]))
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    home = tmp_path_factory.mktemp("airflow_home")
    probe_script = home / "probe_dag_file.py"
    probe_script.write_text(PROBE % {"heavy": HEAVY})
    # Two at a time: the machine has two cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda p: probe(p, home / p.stem, probe_script), dag_files()))


def test_the_pipeline_dags_exist(reports):
    found = {dag_id for r in reports for dag_id in r.get("dags", {})}
    missing = REQUIRED_DAG_IDS - found
    assert not missing, f"DAG ids missing from {DAGS}: {sorted(missing)} (found {sorted(found)})"


def test_every_dag_file_imports_without_errors(reports):
    assert reports, f"no DAG files in {DAGS}"
    for report in reports:
        assert report["returncode"] == 0, f"{report['file']} failed to import:\n{report['stderr']}"
        assert report["import_errors"] == {}, f"{report['file']}: {report['import_errors']}"


def test_dag_ids_are_unique(reports):
    seen: dict[str, str] = {}
    for report in reports:
        for dag_id in report.get("dags", {}):
            assert dag_id not in seen, f"{dag_id} defined in both {seen[dag_id]} and {report['file']}"
            seen[dag_id] = report["file"]


def test_every_dag_has_tags_and_retries(reports):
    dags = {dag_id: (r["file"], dag) for r in reports for dag_id, dag in r.get("dags", {}).items()}
    assert dags, f"no DAGs parsed from {DAGS}"
    for dag_id, (file, dag) in dags.items():
        assert dag["tags"], f"{dag_id} ({file}) has no tags"
        assert "retries" in dag["default_args"], f"{dag_id} ({file}) sets no retries in default_args"


def test_no_heavy_import_at_dag_module_top(reports):
    assert reports, f"no DAG files in {DAGS}"
    for report in reports:
        assert report["returncode"] == 0, f"{report['file']} failed to import:\n{report['stderr']}"
        heavy = sorted(set(report["after_import"]) - set(report["baseline"]))
        where = {m: f"line {report['culprits'].get(m, '?')}" for m in heavy}
        assert not heavy, (f"importing {report['file']} imports {heavy} at module top ({where}): "
                           "import them inside the task functions")


def test_every_dag_times_out_and_tells_on_call(reports):
    dags = {dag_id: (r["file"], dag) for r in reports for dag_id, dag in r.get("dags", {}).items()}
    assert dags, f"no DAGs parsed from {DAGS}"
    for dag_id, (file, dag) in dags.items():
        assert dag["dagrun_timeout"] != "None", f"{dag_id} ({file}) has no dagrun_timeout"
        assert "OnCallNotifier" in dag["on_failure"], f"{dag_id} ({file}) notifies no one on failure"
        untimed = [task for task, timeout in dag["tasks"].items() if timeout == "None"]
        assert not untimed, f"{dag_id} ({file}): tasks without execution_timeout: {untimed}"


def test_rollback_form_takes_what_the_form_sends_and_check_form_says_what_is_wrong(reports):
    """The form's schemas take any text or nothing (a violated constraint would show jsonschema's raw
    text); the first task refuses bad input in one line that names the field and what it takes."""
    import jsonschema

    from tasks.errors import StepFailed
    from tasks.rollback import rollback_request

    [params] = [dag["params"] for r in reports for dag_id, dag in r.get("dags", {}).items()
                if dag_id == "onerec_fp8_rollback"]
    for field in ("reason", "version"):
        assert params[field]["title"] and len(params[field]["description"]) > 40, params[field]
        for sent in (None, "", "v2", "2; rm -rf /"):
            jsonschema.validate(sent, params[field])

    assert rollback_request(" INC-42: p99 doubled ", " 0012") == ("INC-42: p99 doubled", "12")
    assert rollback_request("INC-42", "") == ("INC-42", None)
    assert rollback_request("INC-42", 7) == ("INC-42", "7")
    for reason in (None, "", "  ", "ab"):
        with pytest.raises(StepFailed, match=r"^reason: say why you roll back, at least 3 characters") as bad:
            rollback_request(reason, None)
        assert "\n" not in str(bad.value)
    for version in ("v2", "2; rm -rf /", "0", "-1", "1.5", "\u00b2", "9" * 5000, str(2**31), True, [3]):
        with pytest.raises(StepFailed, match=r"^version: a registry version number such as 12 \(digits only") as bad:
            rollback_request("INC-42", version)
        assert "\n" not in str(bad.value) and len(str(bad.value)) < 200
