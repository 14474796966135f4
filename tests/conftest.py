"""Shared fixtures live in tests/fixtures/ (one module per area), loaded here as plugins.

Tests are sorted by what they need, and the folder decides the marker:
    tests/unit/          no server, no GPU: fakes only for what a test does not test
    tests/integration/   real local servers on loopback (s3rver, MLflow, Airflow, uvicorn); marker `integration`
    tests/gpu/           a CUDA GPU (skipped without one); marker `gpu`
A test whose marker or fixtures do not match its folder fails collection, so the split stays true
(`pytest tests/unit` is the quick loop; `make test` runs all three).
"""

from pathlib import Path

import pytest

pytest_plugins = ["fixtures.models", "fixtures.movielens_shape", "fixtures.stack", "fixtures.browser"]

TESTS = Path(__file__).resolve().parent
FOLDER_MARKERS = {"integration": "integration", "gpu": "gpu"}
SERVER_FIXTURES = {"s3_and_mlflow", "local_stack"}


def pytest_collection_modifyitems(config, items):
    misplaced = []
    for item in items:
        folder = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
        marker = FOLDER_MARKERS.get(folder)
        if marker is not None:
            item.add_marker(getattr(pytest.mark, marker))
        for name in FOLDER_MARKERS.values():
            if item.get_closest_marker(name) is not None and FOLDER_MARKERS.get(folder) != name:
                misplaced.append(f"{item.nodeid}: marked {name} but lives in tests/{folder}/")
        if folder != "integration" and SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            misplaced.append(f"{item.nodeid}: starts local servers but lives in tests/{folder}/")
    if misplaced:
        raise pytest.UsageError("tests in the wrong folder:\n  " + "\n  ".join(misplaced))
