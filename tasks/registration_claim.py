"""One registered version per (checkpoint sha256, recipe), also when runs race outside the scheduler.

Two layers, because a lock file is only shared by the processes of one host:

- a lock per (model, checkpoint, recipe) in <state_dir>/locks/, held from "is it registered yet?"
  to the alias: every run on this host (`onerec-fp8 pipeline run`, Airflow's LocalExecutor
  workers, the demo) waits for the one holding it, then finds its version and registers nothing.
  The kernel releases the lock when its holder dies, kill -9 included: no stale claim to clean up.
- the registry decides across hosts (Airflow workers on several machines): right after creating
  its version, a run lists the versions with the same checkpoint_sha256 + recipe; the lowest
  version number wins, and a run whose version lost deletes it and reports the winner. The
  registry's database hands out version numbers in order, so every loser sees the winner and
  exactly one version survives; nothing is left to expire if a run dies halfway.

(An S3 conditional write, PUT with If-None-Match, would be a third way on AWS; the local object
store does not honour it, so the registry is the judge everywhere.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

from ops.processes import file_lock
from tasks.approval import read_record
from tasks.errors import StateError
from tasks.registry import find_versions, registering_run_status

log = logging.getLogger(__name__)


@contextlib.contextmanager
def registration_lock(cfg, checkpoint_sha256: str, recipe: str) -> Iterator[None]:
    """Hold this host's lock for registering `checkpoint_sha256` with `recipe` (blocks until free)."""
    key = hashlib.sha256(f"{cfg.model_name}\n{checkpoint_sha256}\n{recipe}".encode()).hexdigest()[:24]
    path = Path(cfg.state_dir) / "locks" / f"register-{key}.lock"
    log.info("waiting for the registration lock %s", path)
    with file_lock(path):
        yield


def settle_duplicates(mlflow_client, cfg, checkpoint_sha256: str, recipe: str, own_version: str) -> str:
    """The version that stands for this checkpoint + recipe; deletes `own_version` when it lost."""
    same = [v for v in find_versions(cfg, mlflow_client, checkpoint_sha256=checkpoint_sha256, recipe=recipe)
            if v.version == own_version or abandoned_registration(cfg, mlflow_client, v) is None]
    winner = str(min(int(v.version) for v in same)) if same else own_version
    if winner != own_version:
        log.warning("version %s duplicates version %s (same checkpoint %s, recipe %s): deleting it",
                    own_version, winner, checkpoint_sha256[:12], recipe)
        mlflow_client.delete_model_version(cfg.model_name, own_version)
    return winner


def abandoned_registration(cfg, c, mv) -> str | None:
    """Why version `mv` is a half-registered version, or None when it is complete or still being registered.

    Registration ends by writing the version's signed state record (tasks.approval, in S3); a version
    without one was never approved, so nothing can have promoted it. It is abandoned when its run is
    over (failed, killed, or finished without it) or has been RUNNING for longer than any run lasts.
    Tags decide nothing here: deleting the mirror tag `state` does not make a version abandoned.
    """
    try:
        if read_record(cfg, mv.version, mlflow_client=c) is not None:  # the last step of registration ran
            return None
    except StateError:
        return None  # the pipeline's, but its record does not verify: promote refuses it, nothing re-registers
    status = registering_run_status(c, mv)
    if status == "registering":
        return None
    return f"version {mv.version} was left half-registered by run {mv.run_id} ({status}, no state record)"
