"""The local rollout target: serving processes on this machine behind a stable loopback endpoint.

Every call takes the caller's Settings: the state dir, the serving port and the serving child's
environment (`Settings.subprocess_env`: tracking URI, S3, the MLflow account) come from it, never
from this process's environment. A reverse proxy (ops/rollout/proxy.py) on a fixed loopback port
(settings.local_serve_port, 8800 by default) is the stable endpoint; each deploy starts `onerec-fp8 serve` for
the new version (with its signed version digest) on a free port in its own process group, waits
for /v2/health/ready, switches
the proxy to it, then stops the old server gracefully (it drains). Clients of the proxy never
see a failed request. The server runs torch with `threads` CPU threads (default 1: the embedded
stack shares a small machine with Airflow, MLflow and S3, where more OpenMP threads than free
cores made a tiny model's beam search 10x slower). rollback starts the previous revision's
version the same way. A canary (canary_start / canary_weight / canary_status / canary_end,
driven by tasks/canary.py) is a second server beside the serving one that the proxy sends a share
of the recommendation requests to and mirrors the rest to (ops/rollout/proxy.py). State (pids,
ports, revisions, the canary) lives in <state_dir>/serving/local.json;
`stop` keeps it, so `resume` (run by `onerec-fp8 stack up`) serves the current revision again on
the same proxy port after a `stack down` or a reboot.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

from onerec.settings import Settings
from ops.mlflow_auth import secret_token
from ops.processes import file_lock, free_port, is_alive, log_tail, spawn_detached, stop_processes
from ops.rollout.base import RolloutError, pinned_uri

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polls would log every request

REPO_ROOT = Path(__file__).resolve().parents[2]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _state_dir(state_dir: str | Path) -> Path:
    path = Path(state_dir) / "serving"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _spawn(cmd: list[str], log_path: Path, settings: Settings, env: dict | None = None) -> dict:
    """Start `cmd` detached in its own process group (it outlives the caller); {pid, create_time}.
    Its env: `env` (default os.environ: PATH and the like) with `settings` as variables over it."""
    child_env = settings.subprocess_env(env)
    proc = spawn_detached(cmd, log_path, env={**child_env, "PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT)
    if not is_alive(proc):
        raise RolloutError(f"{cmd[2]} exited at once; see {log_path}")
    return {"pid": proc["pid"], "create_time": proc["create_time"]}


def _wait_http(url: str, record: dict, timeout_s: float, log_path: Path) -> None:
    import httpx  # heavy: httpx, only where HTTP is spoken

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive(record):
            raise RolloutError(f"the process for {url} exited before it was ready; log {log_path}:\n{log_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RolloutError(f"{url} not ready after {timeout_s:.0f} s; log {log_path}:\n{log_tail(log_path)}")


def _locked(folder: Path):
    """One rollout at a time per state dir (a promote and a rollback must not interleave)."""
    return file_lock(folder / "rollout.lock")


def _read_state(folder: Path) -> dict:
    path = folder / "local.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"proxy": None, "revision": 0, "current": None, "history": []}


def _write_state(folder: Path, state: dict) -> None:
    tmp = folder / ".local.json.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / "local.json")


def _proxy_up(proxy: dict | None) -> bool:
    import httpx  # heavy: httpx, only where HTTP is spoken

    if not proxy or not is_alive(proxy):
        return False
    try:
        return httpx.get(proxy["url"] + "/_proxy/status", timeout=2.0).json().get("pid") == proxy["pid"]
    except (httpx.HTTPError, ValueError):
        return False


def _ensure_proxy(folder: Path, state: dict, port: int, settings: Settings, env: dict | None = None) -> dict:
    proxy = state.get("proxy")
    if _proxy_up(proxy) and proxy["port"] == port:
        return proxy
    if proxy:
        stop_processes([proxy], 10)
    log_path = folder / "proxy.log"
    cmd = [sys.executable, "-m", "ops.rollout.proxy", "--port", str(port), "--state-file", str(folder / "proxy-upstream.json"),
           "--token-file", str(_proxy_token_file(folder))]
    proxy = {**_spawn(cmd, log_path, settings, env), "port": port, "url": f"http://127.0.0.1:{port}", "log": str(log_path)}
    try:
        _wait_http(proxy["url"] + "/_proxy/status", proxy, 30, log_path)
    except RolloutError:
        stop_processes([proxy], 5)
        raise
    state["proxy"] = proxy
    _write_state(folder, state)
    log.info("local endpoint (proxy) on %s, pid %s", proxy["url"], proxy["pid"])
    return proxy


def _server_command(
    model_uri: str, version: str, digest: str | None, port: int, folder: Path, device: str, threads: int,
    server_args: list[str],
) -> list[str]:
    return [
        sys.executable, "-m", "onerec_fp8.cli", "serve", "--model-uri", model_uri, "--model-version", version,
        *(["--model-digest", digest] if digest else []), "--port", str(port), "--host", "127.0.0.1", "--device", device, "--cache-dir", str(folder / "cache"),
        "--drain-seconds", "0.5", "--graceful-timeout", "20", "--threads", str(threads), *server_args,
    ]


def _proxy_token_file(folder: Path) -> Path:
    """The proxy's admin token (0600, generated once per serving folder)."""
    path = folder / "proxy-admin-token"
    secret_token(path)
    return path


def _admin(proxy: dict, path: str, body: dict) -> dict:
    """An authenticated admin call to the proxy (PUT `path`); httpx.HTTPError when it fails."""
    import httpx  # heavy: httpx, only where HTTP is spoken

    token = _proxy_token_file(Path(proxy["log"]).parent).read_text().strip()
    reply = httpx.put(proxy["url"] + path, json=body, timeout=5.0, headers={"Authorization": f"Bearer {token}"})
    reply.raise_for_status()
    return reply.json()


def _switch(proxy: dict, upstream: str) -> None:
    import httpx  # heavy: httpx, only where HTTP is spoken

    try:
        _admin(proxy, "/_proxy/upstream", {"url": upstream})
        if httpx.get(proxy["url"] + "/v2/health/ready", timeout=5.0).status_code != 200:
            raise RolloutError(f"the local endpoint {proxy['url']} is not ready through the proxy after the switch")
    except httpx.HTTPError as exc:
        raise RolloutError(f"could not switch the local endpoint {proxy['url']} to {upstream}: {exc}") from None


def _set_canary(proxy: dict, upstream: str | None, weight: float = 0.0, version: str = "") -> dict:
    """Send `weight` percent of the recommendation requests to `upstream` (None: none) and mirror the rest."""
    import httpx  # heavy: httpx, only where HTTP is spoken

    try:
        return _admin(proxy, "/_proxy/canary", {"url": upstream, "weight": weight, "version": version, "mirror": True})
    except httpx.HTTPError as exc:
        raise RolloutError(f"could not set the canary of {proxy['url']} to {upstream} at {weight}%: {exc}") from None


def _start_server(
    folder: Path, proxy: dict, previous: dict | None, revision: int, action: str, model_uri: str, version: str,
    settings: Settings, *,
    digest: str | None = None, device: str = "auto", threads: int = 1, ready_timeout_s: float = 300,
    stop_timeout_s: float = 30, server_args: list[str] | None = None, env: dict | None = None,
    canary_weight: float | None = None,
) -> dict:
    """Start a server for `model_uri`, wait until it is ready, switch the proxy to it (or, with
    `canary_weight`, make it the proxy's canary at that share); its record. On failure the proxy
    goes back to `previous` (when it still runs), or drops the canary, and the new server stops."""
    server_port = free_port()
    log_path = folder / f"server-r{revision}.log"
    cmd = _server_command(model_uri, version, digest, server_port, folder, device, threads, list(server_args or []))
    log.info("%s revision %d: %s version %s on port %d", action, revision, model_uri, version, server_port)
    record = {
        "revision": revision, "action": action, "model_uri": model_uri, "version": version, "digest": digest,
        **_spawn(cmd, log_path, settings, env), "port": server_port, "url": f"http://127.0.0.1:{server_port}",
        "log": str(log_path), "deployed_at": _now(),
    }
    try:
        _wait_http(record["url"] + "/v2/health/ready", record, ready_timeout_s, log_path)
        if canary_weight is None:
            _switch(proxy, record["url"])
        else:
            _set_canary(proxy, record["url"], canary_weight, version)
    except BaseException:
        # the old server never stopped serving: put the proxy back if it moved, stop the new one
        if canary_weight is not None:
            with contextlib.suppress(RolloutError):
                _set_canary(proxy, None)
        elif previous and is_alive(previous):
            with contextlib.suppress(RolloutError):
                _switch(proxy, previous["url"])
        stop_processes([record], stop_timeout_s)
        raise
    return record


def _local_rollout(
    settings: Settings, model_uri: str, version: str, action: str, *, stop_timeout_s: float = 30, **server_options,
) -> dict:
    folder = _state_dir(settings.state_dir)
    with _locked(folder):
        state = _read_state(folder)
        proxy = _ensure_proxy(folder, state, settings.local_serve_port, settings)
        revision = state["revision"] + 1
        old = state.get("current")
        record = _start_server(folder, proxy, old, revision, action, model_uri, version, settings,
                               stop_timeout_s=stop_timeout_s, **server_options)
        state.update(revision=revision, current=record)
        state["history"].append({k: v for k, v in record.items() if k not in ("pid", "create_time")})
        _write_state(folder, state)
        if old:
            log.info("stopping revision %s (version %s, pid %s)", old["revision"], old["version"], old["pid"])
            stop_processes([old], stop_timeout_s)
    return {
        "target": "local", "action": action, "revision": revision, "url": proxy["url"], "version": version,
        "model_uri": model_uri, "server_url": record["url"], "pid": record["pid"],
        "replaced": None if not old else {"revision": old["revision"], "version": old["version"]},
    }


def resume(settings: Settings, env: dict | None = None, ready_timeout_s: float = 300) -> dict | None:
    """Serve the current revision again when its processes are gone (`stack down`, a reboot): the
    proxy on its port, the same model version on a new server. None when nothing was deployed;
    "resumed": False when it still serves. The revision and the history stay as they are."""
    folder = _state_dir(settings.state_dir)
    with _locked(folder):
        state = _read_state(folder)
        current = state.get("current")
        if current is None:
            return None
        serving = is_alive(current)
        if serving and _proxy_up(state.get("proxy")):
            return {"target": "local", "resumed": False, "version": current["version"], "url": state["proxy"]["url"]}
        proxy = _ensure_proxy(folder, state, (state.get("proxy") or {}).get("port") or settings.local_serve_port,
                              settings, env)
        if serving:
            _switch(proxy, current["url"])
        else:
            record = _start_server(folder, proxy, None, current["revision"], current["action"], current["model_uri"],
                                   current["version"], settings, digest=current.get("digest"),
                                   ready_timeout_s=ready_timeout_s, env=env)
            state["current"] = {**record, "deployed_at": current["deployed_at"], "resumed_at": _now()}
            _write_state(folder, state)
        log.info("serving revision %s (version %s) again on %s", current["revision"], current["version"], proxy["url"])
    return {"target": "local", "resumed": True, "version": current["version"], "revision": current["revision"],
            "url": proxy["url"]}


def deploy(settings: Settings, model_uri: str, version: str, **options) -> dict:
    return _local_rollout(settings, model_uri, version, "deploy", **options)


def rollback(settings: Settings, model_uri: str | None = None, version: str | None = None, digest: str | None = None,
             **options) -> dict:
    """Restart `model_uri`/`version` (signed version digest `digest`), or by default the revision before
    the current one (with the digest it was deployed with)."""
    if model_uri is None:
        state = _read_state(_state_dir(settings.state_dir))
        current = (state.get("current") or {}).get("revision")
        earlier = [r for r in state["history"] if current is None or r["revision"] < current]
        if not earlier:
            raise RolloutError("nothing to roll back to: no earlier local revision")
        model_uri, version, digest = earlier[-1]["model_uri"], earlier[-1]["version"], earlier[-1].get("digest")
        if version is None:
            raise RolloutError("the previous revision has no version")
    elif version is None:
        raise RolloutError("rollback to a given model_uri needs its version too")
    return _local_rollout(settings, pinned_uri(model_uri, version), str(version), "rollback", digest=digest, **options)


def canary_start(settings: Settings, model_uri: str, version: str, weight: float, *, stop_timeout_s: float = 30,
                 **server_options) -> dict:
    """Start `model_uri` beside the serving revision and send it `weight` percent of the
    recommendation requests (the rest mirrored to it); the serving revision stays as it is.
    A canary left by an interrupted run is stopped first."""
    folder = _state_dir(settings.state_dir)
    with _locked(folder):
        state = _read_state(folder)
        current = state.get("current")
        if not current or not is_alive(current):
            raise RolloutError("a canary runs beside a serving version: nothing serves locally")
        proxy = _ensure_proxy(folder, state, settings.local_serve_port, settings)
        if state.get("canary"):
            stop_processes([state["canary"]], stop_timeout_s)
        revision = state["revision"] + 1
        record = _start_server(folder, proxy, current, revision, "canary", pinned_uri(model_uri, version), str(version),
                               settings, stop_timeout_s=stop_timeout_s, canary_weight=weight, **server_options)
        state["canary"] = record
        _write_state(folder, state)
    return {"target": "local", "action": "canary", "url": proxy["url"], "version": str(version),
            "server_url": record["url"], "weight": weight, "champion": current["version"]}


def _canary_state(folder: Path) -> tuple[dict, dict]:
    state = _read_state(folder)
    if not state.get("canary"):
        raise RolloutError("no canary is running locally")
    return state, state["canary"]


def canary_weight(settings: Settings, weight: float) -> dict:
    """The running canary's share (percent); its evidence starts afresh."""
    folder = _state_dir(settings.state_dir)
    with _locked(folder):
        state, canary = _canary_state(folder)
        return _set_canary(state["proxy"], canary["url"], weight, canary["version"])["canary"]


def canary_status(settings: Settings) -> dict | None:
    """The proxy's view of the canary: share, seconds, both arms' evidence and the mirror comparison."""
    import httpx  # heavy: httpx, only where HTTP is spoken

    state = _read_state(_state_dir(settings.state_dir))
    if not state.get("proxy"):
        return None
    try:
        return httpx.get(state["proxy"]["url"] + "/_proxy/status", timeout=5.0).json()["canary"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise RolloutError(f"the local endpoint {state['proxy']['url']} does not answer: {exc}") from None


def canary_end(settings: Settings, promote: bool, stop_timeout_s: float = 30) -> dict:
    """End the canary: `promote` makes it the serving revision (all traffic, the old server drains
    and stops); otherwise all traffic goes back to the serving revision and the canary stops."""
    folder = _state_dir(settings.state_dir)
    with _locked(folder):
        state, canary = _canary_state(folder)
        proxy, old = state["proxy"], state.get("current")
        if promote:
            _switch(proxy, canary["url"])
        _set_canary(proxy, None)
        if not promote:
            state["canary"] = None
            _write_state(folder, state)
            stop_processes([canary], stop_timeout_s)
            log.info("canary version %s stopped; revision %s serves everything", canary["version"], state["revision"])
            return {"target": "local", "action": "canary-rolled-back", "revision": state["revision"], "url": proxy["url"],
                    "version": (old or {}).get("version"), "rolled_back": canary["version"]}
        revision = state["revision"] + 1
        record = {**canary, "revision": revision, "deployed_at": _now()}
        state.update(revision=revision, current=record, canary=None)
        state["history"].append({k: v for k, v in record.items() if k not in ("pid", "create_time")})
        _write_state(folder, state)
        if old:
            log.info("stopping revision %s (version %s, pid %s)", old["revision"], old["version"], old["pid"])
            stop_processes([old], stop_timeout_s)
    return {"target": "local", "action": "canary", "revision": revision, "url": proxy["url"], "version": record["version"],
            "model_uri": record["model_uri"], "server_url": record["url"], "pid": record["pid"],
            "replaced": None if not old else {"revision": old["revision"], "version": old["version"]}}


def status(state_dir: str | Path) -> dict:
    folder = _state_dir(state_dir)
    state = _read_state(folder)
    current = state.get("current")
    return {
        "target": "local", "revision": state["revision"], "url": (state.get("proxy") or {}).get("url"),
        "proxy_alive": _proxy_up(state.get("proxy")),
        "current": None if not current else {**current, "alive": is_alive(current)},
        "canary": None if not state.get("canary") else {**state["canary"], "alive": is_alive(state["canary"])},
        "history": [{k: r[k] for k in ("revision", "action", "version", "model_uri", "deployed_at")} for r in state["history"]],
    }


def stop(state_dir: str | Path, timeout_s: float = 30) -> dict:
    """Stop the local target's server and proxy. Their records stay: `resume` serves the same
    revision on the same port again, and the history stays for the next deploy."""
    folder = _state_dir(state_dir)
    with _locked(folder):
        state = _read_state(folder)
        stopped = []
        for key in ("canary", "current", "proxy"):
            if state.get(key) and is_alive(state[key]):
                stop_processes([state[key]], timeout_s)
                stopped.append(key)
        if state.get("canary"):  # never resumed: a restarted endpoint serves the current revision only
            state["canary"] = None
            _write_state(folder, state)
    return {"target": "local", "stopped": stopped}
