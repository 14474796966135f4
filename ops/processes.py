"""Detached server processes: start them, recognise them later, stop them with all they spawned.

A process is known by a record, a JSON-able dict {pid, create_time, log, cmd} that callers keep
in their state files (and may extend with their own keys): the pid alone could have been
reused by another process since, the pid with its create time cannot. Each process runs in its
own session (= process group), so it outlives the caller and can be signalled as a whole.

Also the two other things that local servers need: a free loopback port and a file lock.
Light on purpose (stdlib + psutil): `onerec-fp8 stack status` and DAG tasks import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from onerec.errors import UserError

log = logging.getLogger("ops.processes")

_children: dict[int, subprocess.Popen] = {}  # started by this Python process; reaped when they stop


def spawn_detached(cmd: list[str], log_path: str | Path, env: dict | None = None, cwd: str | Path | None = None) -> dict:
    """Start `cmd` in a new session, stdout and stderr appended to `log_path`; returns its record."""
    import psutil  # optional: psutil

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True,
        )
    _children[proc.pid] = proc
    # Our unreaped child: its /proc entry stays readable even if it has exited already.
    create_time = psutil.Process(proc.pid).create_time()
    log.debug("started pid %d: %s", proc.pid, " ".join(cmd))
    return {"pid": proc.pid, "create_time": create_time, "log": str(log_path), "cmd": list(cmd)}


def process_of(record: dict):
    """The live psutil.Process of a record, or None (exited, zombie, or the pid was reused)."""
    import psutil  # optional: psutil

    pid, create_time = record.get("pid"), record.get("create_time")
    if not pid or create_time is None:
        return None
    child = _children.get(pid)
    if child is not None and child.poll() is not None:  # our own child exited: reap it
        _children.pop(pid, None)
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def is_alive(record: dict) -> bool:
    return process_of(record) is not None


def _tree(records: list[dict]) -> list:
    """Every live process of these records: the leaders, their descendants, their groups' members.

    Descendants are collected too because a server may move its workers to new process groups
    (Airflow's task supervisor does), out of reach of a killpg on the leader's group.
    """
    import psutil  # optional: psutil

    found: dict[int, psutil.Process] = {}
    groups = set()
    for record in records:
        leader = process_of(record)
        if leader is None:
            continue
        for proc in [leader, *leader.children(recursive=True)]:
            found[proc.pid] = proc
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(proc.pid))
    if groups:
        for proc in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if os.getpgid(proc.pid) in groups:
                    found.setdefault(proc.pid, proc)
    return list(found.values())


def _exited(proc) -> bool:
    """Gone, or a zombie: it has exited and only waits for a parent (not us) to reap it."""
    import psutil  # optional: psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def stop_processes(records: list[dict], grace_s: float) -> None:
    """Stop these records' processes and everything they spawned; UserError if any survives.

    SIGTERM to every group and process; the leaders get `grace_s` to shut down cleanly (servers
    drain); then SIGKILL for whatever is left (Airflow's LocalExecutor workers ignore SIGTERM).
    The caller's own process group is never signalled.
    """
    import psutil  # optional: psutil

    leaders = [proc for record in records if (proc := process_of(record)) is not None]
    # A zombie (e.g. of an interrupted `airflow dags test`) cannot be signalled or waited for.
    procs = [p for p in _tree(records) if not _exited(p)]
    groups = set()
    for proc in procs:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(proc.pid))
    groups.discard(os.getpgid(0))

    def send(sig: int) -> None:
        for group in groups:
            with contextlib.suppress(OSError):
                os.killpg(group, sig)
        # one signal per process: a server takes a second SIGTERM as "exit now" (uvicorn then skips
        # its shutdown), so a process its group's signal reached gets no second one
        for proc in procs:
            with contextlib.suppress(OSError, psutil.Error):
                if os.getpgid(proc.pid) not in groups:
                    proc.send_signal(sig)

    send(signal.SIGTERM)
    _, slow = psutil.wait_procs(leaders, timeout=grace_s)
    _, procs = psutil.wait_procs(procs, timeout=1.0)
    if procs:
        if slow:
            log.warning("%d process(es) still running %.0fs after SIGTERM: SIGKILL", len(slow), grace_s)
        send(signal.SIGKILL)
        _, procs = psutil.wait_procs(procs, timeout=5.0)
    procs = [p for p in procs if not _exited(p)]
    if procs:
        raise UserError(f"could not stop pids {[p.pid for p in procs]}")
    for record in records:
        child = _children.pop(record.get("pid"), None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)  # reap, so no zombie stays behind in a long-lived caller


def log_tail(path: str | Path, lines: int = 15) -> str:
    """The last `lines` lines of a process's log, for error messages ("" if it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the `with` block; blocks until free."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
