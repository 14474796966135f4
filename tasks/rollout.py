"""Roll a model version out to serving, and back: the pipeline's promote and rollback steps call this.

    deploy(model_uri, version, target=None, **options) -> dict   ("revision", "url", ...)
    rollback(target=None, model_uri=None, version=None, **options) -> dict
    status(target=None, **options) -> dict ; stop(state_dir=None) -> dict   (local target)

The target comes from the argument, else ONEREC_ROLLOUT_TARGET, else "local":

- `helm` (production): `helm upgrade --install` of helm/onerec-serving with model.uri/model.version
  set, atomic (a failure rolls the release back by itself) with --wait and a timeout; the Helm
  CLI when `helm` is on PATH, else the same actions through helm-python-sdk (the Helm v4 engine
  as a library). Returns the release revision. rollback = `helm rollback` to the last revision
  before the current one that was deployed successfully. Options (or environment):
  release (ONEREC_HELM_RELEASE, onerec-serving), namespace (ONEREC_HELM_NAMESPACE, onerec),
  values_files (ONEREC_HELM_VALUES, os.pathsep-separated), kube_context (ONEREC_KUBE_CONTEXT),
  kubeconfig (KUBECONFIG), timeout_s, chart.
- `local` (the embedded default): a reverse proxy on a fixed loopback port (ONEREC_LOCAL_SERVE_PORT,
  8800) is the stable endpoint; each deploy starts `onerec-fp8 serve` for the new version on a
  free port in its own process group, waits for /v2/health/ready, switches the proxy to it,
  then stops the old server gracefully (it drains). Clients of the proxy never see a failed
  request. The server runs torch with `threads` CPU threads (default 1: the embedded stack
  shares a small machine with Airflow, MLflow and S3, where more OpenMP threads than free cores
  made a tiny model's beam search 10x slower). rollback starts the previous revision's version the same way. State (pids, ports,
  revisions) lives in <ONEREC_STATE_DIR>/serving/local.json.

Either way a failed rollout raises RolloutError and leaves the previous version serving; the
caller then leaves the registry aliases unchanged. Registry URIs with an alias are pinned to
`models:/NAME/VERSION` before deploying, so a later alias move cannot change what runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onerec.errors import UserError
from onerec.processes import file_lock, free_port, is_alive, log_tail, spawn_detached, stop_processes

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polls would log every request

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "helm" / "onerec-serving"
TARGETS = ("local", "helm")
DEFAULT_LOCAL_PORT = 8800


class RolloutError(UserError):
    """A rollout or rollback did not complete; what served before still serves."""


def resolve_target(target: str | None = None) -> str:
    target = target or os.environ.get("ONEREC_ROLLOUT_TARGET") or "local"
    if target not in TARGETS:
        raise UserError(f"rollout target must be one of {TARGETS}, not {target!r} (ONEREC_ROLLOUT_TARGET)")
    return target


def pinned_uri(model_uri: str, version: str | int | None) -> str:
    from onerec.serve.model_store import parse_model_uri

    return parse_model_uri(model_uri).pinned_uri(None if version is None else str(version))


def deploy(model_uri: str, version: str | int, target: str | None = None, **options) -> dict:
    """Serve `model_uri` (label `version`) on `target`; returns at least target, revision, url, version."""
    target = resolve_target(target)
    uri = pinned_uri(model_uri, version)
    if target == "helm":
        return helm_deploy(uri, str(version), **options)
    return local_deploy(uri, str(version), **options)


def rollback(target: str | None = None, model_uri: str | None = None, version: str | int | None = None, **options) -> dict:
    """Back to the previous version (or to `model_uri`/`version` when given: the local target restarts it)."""
    target = resolve_target(target)
    if target == "helm":
        return helm_rollback(**options)
    return local_rollback(model_uri, None if version is None else str(version), **options)


def status(target: str | None = None, **options) -> dict:
    target = resolve_target(target)
    return helm_status(**options) if target == "helm" else local_status(**options)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --- local target: processes ---------------------------------------------------------------------


def _state_dir(state_dir: str | Path | None) -> Path:
    root = Path(state_dir or os.environ.get("ONEREC_STATE_DIR") or REPO_ROOT / ".onerec")
    path = root / "serving"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _spawn(cmd: list[str], log_path: Path) -> dict:
    """Start `cmd` detached in its own process group (it outlives the caller); {pid, create_time}."""
    proc = spawn_detached(cmd, log_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT)
    if not is_alive(proc):
        raise RolloutError(f"{cmd[2]} exited at once; see {log_path}")
    return {"pid": proc["pid"], "create_time": proc["create_time"]}


def _wait_http(url: str, record: dict, timeout_s: float, log_path: Path) -> None:
    import httpx

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
    import httpx

    if not proxy or not is_alive(proxy):
        return False
    try:
        return httpx.get(proxy["url"] + "/_proxy/status", timeout=2.0).json().get("pid") == proxy["pid"]
    except (httpx.HTTPError, ValueError):
        return False


def _ensure_proxy(folder: Path, state: dict, port: int | None) -> dict:
    proxy = state.get("proxy")
    port = port or (proxy or {}).get("port") or int(os.environ.get("ONEREC_LOCAL_SERVE_PORT", DEFAULT_LOCAL_PORT))
    if _proxy_up(proxy) and proxy["port"] == port:
        return proxy
    if proxy:
        stop_processes([proxy], 10)
    log_path = folder / "proxy.log"
    cmd = [sys.executable, "-m", "onerec.serve.proxy", "--port", str(port), "--state-file", str(folder / "proxy-upstream.json"),
           "--token-file", str(_proxy_token_file(folder))]
    proxy = {**_spawn(cmd, log_path), "port": port, "url": f"http://127.0.0.1:{port}", "log": str(log_path)}
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
    model_uri: str, version: str, port: int, folder: Path, device: str, threads: int, server_args: list[str],
) -> list[str]:
    return [
        sys.executable, "-m", "onerec.cli", "serve", "--model-uri", model_uri, "--model-version", version,
        "--port", str(port), "--host", "127.0.0.1", "--device", device, "--cache-dir", str(folder / "cache"),
        "--drain-seconds", "0.5", "--graceful-timeout", "20", "--threads", str(threads), *server_args,
    ]


def _proxy_token_file(folder: Path) -> Path:
    """The proxy's admin token (0600, generated once per serving folder)."""
    from onerec.mlflow_auth import secret_token

    path = folder / "proxy-admin-token"
    secret_token(path)
    return path


def _switch(proxy: dict, upstream: str) -> None:
    import httpx

    token = _proxy_token_file(Path(proxy["log"]).parent).read_text().strip()
    try:
        reply = httpx.put(proxy["url"] + "/_proxy/upstream", json={"url": upstream}, timeout=5.0,
                          headers={"Authorization": f"Bearer {token}"})
        reply.raise_for_status()
        if httpx.get(proxy["url"] + "/v2/health/ready", timeout=5.0).status_code != 200:
            raise RolloutError(f"the local endpoint {proxy['url']} is not ready through the proxy after the switch")
    except httpx.HTTPError as exc:
        raise RolloutError(f"could not switch the local endpoint {proxy['url']} to {upstream}: {exc}") from None


def _local_rollout(
    model_uri: str, version: str, action: str, *, state_dir=None, port: int | None = None, device: str = "auto",
    threads: int = 1, ready_timeout_s: float = 300, stop_timeout_s: float = 30, server_args: list[str] | None = None,
) -> dict:
    folder = _state_dir(state_dir)
    with _locked(folder):
        state = _read_state(folder)
        proxy = _ensure_proxy(folder, state, port)
        revision = state["revision"] + 1
        server_port = free_port()
        log_path = folder / f"server-r{revision}.log"
        cmd = _server_command(model_uri, version, server_port, folder, device, threads, list(server_args or []))
        log.info("%s revision %d: %s version %s on port %d", action, revision, model_uri, version, server_port)
        record = {
            "revision": revision, "action": action, "model_uri": model_uri, "version": version, **_spawn(cmd, log_path),
            "port": server_port, "url": f"http://127.0.0.1:{server_port}", "log": str(log_path),
            "deployed_at": _now(),
        }
        try:
            _wait_http(record["url"] + "/v2/health/ready", record, ready_timeout_s, log_path)
            _switch(proxy, record["url"])
        except BaseException:
            # the old server never stopped serving: put the proxy back if it moved, stop the new one
            old = state.get("current")
            if old and is_alive(old):
                with contextlib.suppress(RolloutError):
                    _switch(proxy, old["url"])
            stop_processes([record], stop_timeout_s)
            raise
        old = state.get("current")
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


def local_deploy(model_uri: str, version: str, **options) -> dict:
    return _local_rollout(model_uri, version, "deploy", **options)


def local_rollback(model_uri: str | None = None, version: str | None = None, **options) -> dict:
    """Restart `model_uri`/`version`, or by default the revision before the current one."""
    if model_uri is None:
        state = _read_state(_state_dir(options.get("state_dir")))
        current = (state.get("current") or {}).get("revision")
        earlier = [r for r in state["history"] if current is None or r["revision"] < current]
        if not earlier:
            raise RolloutError("nothing to roll back to: no earlier local revision")
        model_uri, version = earlier[-1]["model_uri"], earlier[-1]["version"]
        if version is None:
            raise RolloutError("the previous revision has no version")
    elif version is None:
        raise RolloutError("rollback to a given model_uri needs its version too")
    return _local_rollout(pinned_uri(model_uri, version), str(version), "rollback", **options)


def local_status(state_dir=None, **_) -> dict:
    folder = _state_dir(state_dir)
    state = _read_state(folder)
    current = state.get("current")
    return {
        "target": "local", "revision": state["revision"], "url": (state.get("proxy") or {}).get("url"),
        "proxy_alive": _proxy_up(state.get("proxy")),
        "current": None if not current else {**current, "alive": is_alive(current)},
        "history": [{k: r[k] for k in ("revision", "action", "version", "model_uri", "deployed_at")} for r in state["history"]],
    }


def stop(state_dir=None, timeout_s: float = 30) -> dict:
    """Stop the local target's server and proxy (the history stays for the next deploy)."""
    folder = _state_dir(state_dir)
    with _locked(folder):
        state = _read_state(folder)
        stopped = []
        for key in ("current", "proxy"):
            if state.get(key):
                stop_processes([state[key]], timeout_s)
                stopped.append(key)
        state.update(current=None, proxy=None)
        _write_state(folder, state)
    return {"target": "local", "stopped": stopped}


# --- helm target ---------------------------------------------------------------------------------


def _helm_options(
    release: str | None = None, namespace: str | None = None, values_files: list[str] | None = None,
    kube_context: str | None = None, kubeconfig: str | None = None, timeout_s: float = 600,
    chart: str | Path | None = None, dry_run: bool = False, **_,
) -> dict:
    files = values_files
    if files is None:
        files = [f for f in os.environ.get("ONEREC_HELM_VALUES", "").split(os.pathsep) if f]
    return {
        "release": release or os.environ.get("ONEREC_HELM_RELEASE") or "onerec-serving",
        "namespace": namespace or os.environ.get("ONEREC_HELM_NAMESPACE") or "onerec",
        "values_files": [str(f) for f in files],
        "kube_context": kube_context or os.environ.get("ONEREC_KUBE_CONTEXT") or None,
        "kubeconfig": kubeconfig or os.environ.get("KUBECONFIG") or None,
        "timeout_s": int(timeout_s),
        "chart": str(chart or CHART),
        "dry_run": bool(dry_run),  # render and validate through the Helm engine; touch no cluster
    }


def _model_values(model_uri: str, version: str) -> dict:
    values = {"model": {"uri": model_uri, "version": version}}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        values["mlflow"] = {"trackingUri": os.environ["MLFLOW_TRACKING_URI"]}
    return values


def _service_url(release: str, namespace: str) -> str:
    name = release if "onerec-serving" in release else f"{release}-onerec-serving"
    return f"http://{name[:63].rstrip('-')}.{namespace}.svc.cluster.local"


def _helm_cli() -> str | None:
    return shutil.which("helm")


def _run_helm(helm: str, args: list[str], o: dict, timeout_s: float) -> str:
    cmd = [helm, *args, "--namespace", o["namespace"]]
    if o["kube_context"]:
        cmd += ["--kube-context", o["kube_context"]]
    if o["kubeconfig"]:
        cmd += ["--kubeconfig", o["kubeconfig"]]
    log.info("running %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RolloutError(f"helm {args[0]} did not finish in {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise RolloutError(f"helm {args[0]} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def _atomic_flag(helm: str) -> str:
    """Helm 3 spells it --atomic; Helm 4 renamed it --rollback-on-failure."""
    out = subprocess.run([helm, "version", "--template", "{{.Version}}"], capture_output=True, text=True, timeout=30)
    return "--atomic" if out.stdout.strip().startswith("v3") else "--rollback-on-failure"


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _sdk_config(o: dict):
    import helm_python as hp

    return hp.Config(
        kubeconfig_path=o["kubeconfig"], kube_context=o["kube_context"], namespace=o["namespace"],
        storage_driver="memory" if o.get("dry_run") else None,
    )


def helm_deploy(model_uri: str, version: str, **options) -> dict:
    o = _helm_options(**options)
    values = _model_values(model_uri, version)
    helm = _helm_cli()
    if helm:
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="onerec-values-") as extra:
            json.dump(values, extra)
            extra.flush()
            args = ["upgrade", "--install", o["release"], o["chart"], "--create-namespace", _atomic_flag(helm),
                    "--wait", "--timeout", f"{o['timeout_s']}s", "--output", "json"]
            if o["dry_run"]:
                args.append("--dry-run=client")
            for f in [*o["values_files"], extra.name]:
                args += ["--values", f]
            release = json.loads(_run_helm(helm, args, o, o["timeout_s"] + 60))
        engine = "helm-cli"
    else:
        import helm_python as hp
        import yaml

        merged: dict = {}
        for f in o["values_files"]:
            merged = _deep_merge(merged, yaml.safe_load(Path(f).read_text()) or {})
        merged = _deep_merge(merged, values)
        try:
            with _sdk_config(o) as cfg, hp.Chart.load(o["chart"]) as chart:
                exists = False
                if not o["dry_run"]:
                    try:
                        cfg.history(o["release"])
                        exists = True
                    except hp.HelmNotFoundError:
                        pass
                common = dict(namespace=o["namespace"], timeout=o["timeout_s"], wait="watcher", rollback_on_failure=True)
                if o["dry_run"]:
                    common = dict(namespace=o["namespace"], dry_run="client")
                if exists:
                    release = cfg.upgrade(chart, o["release"], merged, **common)
                else:
                    release = cfg.install(chart, o["release"], merged, create_namespace=True, **common)
        except hp.HelmError as exc:
            raise RolloutError(f"helm upgrade --install of {o['release']} failed: {exc}") from None
        engine = "helm-python-sdk"
    revision = _revision_of(release)
    log.info("helm release %s revision %d serves version %s%s", o["release"], revision, version,
             " (dry run)" if o["dry_run"] else "")
    result = {
        "target": "helm", "engine": engine, "release": o["release"], "namespace": o["namespace"],
        "revision": revision, "version": version, "model_uri": model_uri, "url": _service_url(o["release"], o["namespace"]),
    }
    if o["dry_run"]:
        result.update(dry_run=True, manifest=release.get("manifest", ""))
    return result


def _status_of(entry: dict) -> str:
    info = entry.get("info")
    return str((info or {}).get("status") if isinstance(info, dict) else entry.get("status", "")).lower()


def _revision_of(entry: dict) -> int:
    return int(entry.get("revision", entry.get("version", 0)))


def _previous_good(history: list[dict], current: int) -> int:
    """The newest revision before `current` that was deployed successfully (superseded since)."""
    good = [_revision_of(h) for h in history if _revision_of(h) < current and _status_of(h) in ("superseded", "deployed")]
    if not good:
        raise RolloutError(f"nothing to roll back to: no successful revision before {current}")
    return max(good)


def helm_rollback(revision: int | None = None, **options) -> dict:
    o = _helm_options(**options)
    helm = _helm_cli()
    if helm:
        history = json.loads(_run_helm(helm, ["history", o["release"], "--output", "json"], o, 120))
        current = max(_revision_of(h) for h in history if _status_of(h) == "deployed")
        to = revision or _previous_good(history, current)
        _run_helm(helm, ["rollback", o["release"], str(to), "--wait", "--timeout", f"{o['timeout_s']}s"], o, o["timeout_s"] + 60)
        new = json.loads(_run_helm(helm, ["status", o["release"], "--output", "json"], o, 120))
        values = json.loads(_run_helm(helm, ["get", "values", o["release"], "--output", "json"], o, 120))
    else:
        import helm_python as hp

        try:
            with _sdk_config(o) as cfg:
                history = cfg.history(o["release"])
                current = max(_revision_of(h) for h in history if _status_of(h) == "deployed")
                to = revision or _previous_good(history, current)
                cfg.rollback(o["release"], version=to, timeout=o["timeout_s"], wait="watcher")
                new = cfg.status(o["release"])
                values = cfg.get_values(o["release"])
        except hp.HelmError as exc:
            raise RolloutError(f"helm rollback of {o['release']} failed: {exc}") from None
    model = (values or {}).get("model", {})
    return {
        "target": "helm", "release": o["release"], "namespace": o["namespace"], "revision": _revision_of(new),
        "rolled_back_from": current, "rolled_back_to": to, "version": model.get("version"),
        "model_uri": model.get("uri"), "url": _service_url(o["release"], o["namespace"]),
    }


def helm_status(**options) -> dict:
    o = _helm_options(**options)
    helm = _helm_cli()
    if helm:
        release = json.loads(_run_helm(helm, ["status", o["release"], "--output", "json"], o, 120))
    else:
        import helm_python as hp

        try:
            with _sdk_config(o) as cfg:
                release = cfg.status(o["release"])
        except hp.HelmError as exc:
            raise RolloutError(f"helm status of {o['release']} failed: {exc}") from None
    return {"target": "helm", "release": o["release"], "namespace": o["namespace"],
            "revision": _revision_of(release), "status": _status_of(release)}


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.rollout deploy|rollback|status|stop ...`: by hand, outside the pipeline."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.rollout", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["deploy", "rollback", "status", "stop"])
    parser.add_argument("--model-uri")
    parser.add_argument("--version")
    parser.add_argument("--target", choices=TARGETS)
    parser.add_argument("--port", type=int, help="local target: the stable endpoint's port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    local = {"port": args.port} if args.port and resolve_target(args.target) == "local" else {}
    try:
        if args.action == "deploy":
            if not (args.model_uri and args.version):
                raise UserError("deploy needs --model-uri and --version")
            result = deploy(args.model_uri, args.version, args.target, **local)
        elif args.action == "rollback":
            result = rollback(args.target, args.model_uri, args.version, **local)
        elif args.action == "status":
            result = status(args.target)
        else:
            result = stop()
    except UserError as exc:
        print(f"rollout {args.action}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
