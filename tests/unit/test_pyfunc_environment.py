"""The registered pyfunc model restores from what it lists: it names no unpublished package and
carries the library its code imports, so it loads where this package is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import requires

import mlflow
import pandas as pd
from packaging.requirements import Requirement

from tasks.register import DISTRIBUTION, pyfunc_model

# the load, in an interpreter that cannot import this package (isolated mode, and the editable
# install's import hook removed): only the model's own code/ folder can provide `onerec`
ISOLATED_LOAD = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if not p.startswith("__editable__")]
try:
    import onerec
    raise SystemExit("onerec importable before the model is loaded: the check proves nothing")
except ImportError:
    pass
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.read_parquet(sys.argv[2]), params={"k": 4})
import onerec
print(json.dumps({"onerec": onerec.__file__, "items": out["items"][0]}))
"""


def test_the_pyfunc_model_restores_from_what_it_lists(trained_tiny, tmp_path):
    path = tmp_path / "model"
    mlflow.pyfunc.save_model(str(path), **pyfunc_model(trained_tiny.checkpoint_dir))
    listed = [Requirement(line) for line in (path / "requirements.txt").read_text().split() if line]
    names = {r.name for r in listed}
    assert DISTRIBUTION not in names and "onerec" not in names
    core = {Requirement(r).name for r in requires(DISTRIBUTION) if "extra ==" not in r}
    assert names == core | {"mlflow"}, names  # the library's dependencies and MLflow, nothing else
    assert (path / "code" / "onerec" / "__init__.py").is_file()

    requests = tmp_path / "requests.parquet"
    pd.read_parquet(trained_tiny.calibration_path).head(1).drop(columns=["target"]).to_parquet(requests)
    done = subprocess.run([sys.executable, "-I", "-c", ISOLATED_LOAD, str(path), str(requests)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["onerec"].startswith(str(path / "code"))
    here = mlflow.pyfunc.load_model(str(path)).predict(pd.read_parquet(requests), params={"k": 4})
    assert loaded["items"] == list(here["items"][0]) and len(loaded["items"]) == 4
