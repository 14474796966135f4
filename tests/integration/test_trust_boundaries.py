"""What an account with write access to the registry or the artifact store cannot do, on the real stack.

- bytes swapped in the artifact store (the weights with a matching manifest, the pyfunc code, its
  MLmodel) are never loaded: promote refuses them, and a server given the signed digest refuses
  to become ready, with a one-line reason, also when an intact copy sits in its cache;
- the approval guard decides on exactly the JSON object MLflow applies: a double-encoded body, a
  text/plain body or a decoy query parameter is a 400 and changes nothing; the admin account is
  not an approver; an approver decides `approval` and changes nothing else; renaming or deleting
  the registered model needs the admin; the state sequence only grows; every account change is
  a line in the server's log.

Shares the pipeline tests' servers, fixtures and helpers (test_pipeline_integration).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from test_pipeline_integration import account, approve_as_the_ui_does, config, publish, stack, tiny  # noqa: F401

from onerec.errors import UserError

pytestmark = pytest.mark.integration


def artifact_keys(cfg, model_id: str) -> dict[str, str]:
    """Relative path in the logged model -> S3 key, for every file MLflow stored for `model_id`."""
    from tasks.checkpoints import s3_client

    s3 = s3_client(cfg)
    keys = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=cfg.s3_bucket, Prefix="mlflow/"):
        for item in page.get("Contents", []):
            marker = f"/models/{model_id}/artifacts/"
            if marker in item["Key"]:
                keys[item["Key"].split(marker, 1)[1]] = item["Key"]
    return keys


def serve_once(cfg, version: str, digest: str, cache: Path) -> subprocess.CompletedProcess:
    """`onerec-fp8 serve` of the registry version until it exits (it never does once ready: timeout)."""
    from ops.processes import free_port

    return subprocess.run(
        [sys.executable, "-m", "onerec_fp8.cli", "serve", "--model-uri", f"models:/{cfg.model_name}/{version}",
         "--model-digest", digest, "--port", str(free_port()), "--device", "cpu", "--cache-dir", str(cache),
         "--threads", "1"],
        capture_output=True, text=True, timeout=180, env=cfg.subprocess_env(),
    )


def test_swapped_weights_code_or_mlmodel_are_never_served(stack, tiny, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from onerec.manifest import write_manifest
    from onerec.serve.app import ServerConfig, create_app
    from onerec.serve.registry import download_verified
    from tasks.checkpoints import s3_client
    from tasks.errors import ProvenanceError
    from tasks.provenance import verify_version
    from tasks.registry import client
    from tasks.requantize import run_requantize

    cfg = config(stack, "swap")
    c = client(cfg)
    publish(cfg, tiny.checkpoint_dir, tiny.calibration_path, "20260101T000000Z")
    version = run_requantize(cfg)["version"]
    mv = c.get_model_version(cfg.model_name, version)
    signed = verify_version(cfg, c, mv)["evidence"]["version_sha256"]
    warm = tmp_path / "warm-cache"
    download_verified(f"models:/{cfg.model_name}/{version}", warm, signed, cfg.tracking_uri())  # an earlier download
    keys = artifact_keys(cfg, mv.source.removeprefix("models:/"))
    [code] = [k for k in keys if k.rsplit("/", 1)[-1] == "pyfunc_model.py"]
    library = sorted(k for k in keys if k.startswith("code/") and k.endswith(".py"))[0]  # onerec/, carried
    s3 = s3_client(cfg)
    original = {path: s3.get_object(Bucket=cfg.s3_bucket, Key=keys[path])["Body"].read() for path in keys}
    quantized = yaml.safe_load(original["MLmodel"])["flavors"]["python_function"]["artifacts"]["quantized"]["path"]
    assert f"{quantized}/manifest.json" in keys, sorted(keys)

    # the weights and their manifest swapped together (the folder is consistent in itself)
    swapped = tmp_path / "swapped"
    for path, data in original.items():
        if path.startswith(f"{quantized}/"):
            (swapped / path).parent.mkdir(parents=True, exist_ok=True)
            (swapped / path).write_bytes(data)
    weights = next(p for p in (swapped / quantized).rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    write_manifest(swapped / quantized)
    attacks = {
        "weights": {p: (swapped / p).read_bytes() for p in (f"{quantized}/manifest.json",
                                                             weights.relative_to(swapped).as_posix())},
        "pyfunc code": {code: original[code] + b"\nimport os; os.system('touch /tmp/onerec-pwned')\n"},
        "library code": {library: original[library] + b"\nimport os; os.system('touch /tmp/onerec-pwned')\n"},
        "MLmodel": {"MLmodel": original["MLmodel"] + b"# edited\n"},
    }
    for attack, files in attacks.items():
        for path, data in files.items():
            s3.put_object(Bucket=cfg.s3_bucket, Key=keys[path], Body=data)
        try:
            with pytest.raises(ProvenanceError, match="does not verify"):
                verify_version(cfg, c, mv)  # what promote and rollback check, on a fresh download
            served = serve_once(cfg, version, signed, tmp_path / f"cache-{attack.replace(' ', '-')}")
            assert served.returncode == 1, (attack, served.stderr[-2000:])
            last = served.stderr.strip().splitlines()[-1]
            assert "are not the signed ones" in last and "refusing to load" in last, (attack, last)
        finally:
            for path in files:
                s3.put_object(Bucket=cfg.s3_bucket, Key=keys[path], Body=original[path])

    # readiness says why; a cached copy is hashed again on use: an altered one is replaced by the
    # store's bytes, which are verified in turn
    s3.put_object(Bucket=cfg.s3_bucket, Key=keys[code], Body=attacks["pyfunc code"][code])
    try:
        app = create_app(ServerConfig(model_uri=f"models:/{cfg.model_name}/{version}", model_digest=signed,
                                      device="cpu", cache_dir=str(tmp_path / "cache-ready"), settings=cfg))
        with TestClient(app) as http:
            for _ in range(600):
                reply = http.get("/v2/health/ready")
                if "signed" in reply.json().get("reason", ""):
                    break
                time.sleep(0.1)
        assert reply.status_code == 503 and "are not the signed ones" in reply.json()["reason"]
        assert "\n" not in reply.json()["reason"]
        cached = next(p for p in (warm / signed).rglob("*.safetensors"))
        cached.write_bytes(b"altered in the cache")
        with pytest.raises(UserError, match="are not the signed ones"):
            download_verified(f"models:/{cfg.model_name}/{version}", warm, signed, cfg.tracking_uri())
    finally:
        s3.put_object(Bucket=cfg.s3_bucket, Key=keys[code], Body=original[code])
    assert download_verified(f"models:/{cfg.model_name}/{version}", warm, signed, cfg.tracking_uri()).is_dir()
    with pytest.raises(UserError, match="needs --model-digest"):
        create_app(ServerConfig(model_uri=f"models:/{cfg.model_name}/{version}"))


def registry_call(stack, cfg, role: str, method: str, endpoint: str, *, body=None, content=None,  # noqa: F811
                  content_type: str = "application/json", params: dict | None = None) -> httpx.Response:
    """One REST call to the registry as `role`; `body` is sent as JSON, `content` as raw bytes."""
    data = content if content is not None else json.dumps(body or {})
    return httpx.request(method, f"{cfg.tracking_uri()}/api/2.0/mlflow/{endpoint}", content=data, params=params,
                         headers={"Content-Type": content_type}, auth=account(stack, role), timeout=30,
                         trust_env=False)


def test_the_guard_decides_on_what_mlflow_applies(stack, tmp_path):  # noqa: F811
    import mlflow

    from tasks.registry import client, use_tracking_server

    cfg = config(stack, "guard")
    c = client(cfg)  # the service account
    use_tracking_server(cfg)
    mlflow.set_experiment("onerec-fp8-guard-test")
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model/weights.txt")
    c.create_registered_model(cfg.model_name)
    version = c.create_model_version(cfg.model_name, f"runs:/{run.info.run_id}/model", run.info.run_id,
                                     tags={"approval": "pending"}).version
    tag = {"name": cfg.model_name, "version": version}

    def tags() -> dict:
        return c.get_model_version(cfg.model_name, version).tags

    # the admin is no approver: neither plainly nor through a body MLflow decodes twice
    approve = {**tag, "key": "approval", "value": "approved"}
    assert registry_call(stack, cfg, "admin", "POST", "model-versions/set-tag", body=approve).status_code == 403
    double = registry_call(stack, cfg, "admin", "POST", "model-versions/set-tag", content=json.dumps(json.dumps(approve)))
    assert double.status_code == 400 and "JSON object" in double.json()["message"]
    for key in ("approval_by", "approval_at"):
        forged = json.dumps(json.dumps({**tag, "key": key, "value": "approver"}))
        assert registry_call(stack, cfg, "admin", "POST", "model-versions/set-tag", content=forged).status_code == 400
    assert tags()["approval"] == "pending" and "approval_by" not in tags()

    approve_as_the_ui_does(stack, cfg, version).raise_for_status()
    assert tags()["approval"] == "approved" and tags()["approval_by"] == "approver" and tags()["approval_at"]

    # deletes are guarded like sets: a text/plain body with a decoy query parameter, or a plain one
    delete = {**tag, "key": "approval_at"}
    decoy = registry_call(stack, cfg, "service", "DELETE", "model-versions/delete-tag", content=json.dumps(delete),
                          content_type="text/plain", params={"key": "harmless"})
    assert decoy.status_code == 400 and "query parameters" in decoy.json()["message"]
    for key in ("approval_at", "approval"):
        refused = registry_call(stack, cfg, "service", "DELETE", "model-versions/delete-tag", body={**tag, "key": key})
        assert refused.status_code == 403, refused.text
    assert tags()["approval"] == "approved" and tags()["approval_at"]

    # an approver decides approval and nothing else; renaming or deleting the model needs the admin
    for method, endpoint, body in (
        ("POST", "model-versions/set-tag", {**tag, "key": "recipe", "value": "fp8_block"}),
        ("POST", "registered-models/alias", {"name": cfg.model_name, "alias": "champion", "version": version}),
        ("PATCH", "model-versions/update", {**tag, "description": "looks fine"}),
        ("DELETE", "model-versions/delete", tag),
        ("POST", "registered-models/rename", {"name": cfg.model_name, "new_name": f"{cfg.model_name}-x"}),
        ("DELETE", "registered-models/delete", {"name": cfg.model_name}),
    ):
        refused = registry_call(stack, cfg, "approver", method, endpoint, body=body)
        assert refused.status_code == 403, (endpoint, refused.text)
    for method, endpoint, body in (("POST", "registered-models/rename",
                                    {"name": cfg.model_name, "new_name": f"{cfg.model_name}-x"}),
                                   ("DELETE", "registered-models/delete", {"name": cfg.model_name})):
        assert registry_call(stack, cfg, "service", method, endpoint, body=body).status_code == 403
    assert c.get_registered_model(cfg.model_name).name == cfg.model_name and "recipe" not in tags()

    # the state sequence only grows, and a version that has one is not deleted by the service account
    c.set_model_version_tag(cfg.model_name, version, "state_sequence", "2")
    for method, endpoint, body in (
        ("POST", "model-versions/set-tag", {**tag, "key": "state_sequence", "value": "1"}),
        ("POST", "model-versions/set-tag", {**tag, "key": "state_sequence", "value": "2"}),
        ("DELETE", "model-versions/delete-tag", {**tag, "key": "state_sequence"}),
        ("DELETE", "model-versions/delete", tag),
    ):
        assert registry_call(stack, cfg, "service", method, endpoint, body=body).status_code == 403, endpoint
    c.set_model_version_tag(cfg.model_name, version, "state_sequence", "3")
    assert tags()["state_sequence"] == "3"

    # every account change is a line in the server's log, the password never
    password = "a-new-password-for-the-approver"
    moved = httpx.patch(f"{cfg.tracking_uri()}/api/2.0/mlflow/users/update-password", trust_env=False, timeout=30,
                        json={"username": "approver", "password": password}, auth=account(stack, "admin"))
    moved.raise_for_status()
    try:
        log = Path(stack["state"]["services"]["mlflow"]["logs"]["mlflow"]).read_text()
        line = next(x for x in log.splitlines() if "account change by admin" in x and "update-password" in x)
        assert '"approver"' in line and password not in log
    finally:
        from ops.mlflow_auth import ensure_accounts

        ensure_accounts(cfg.tracking_uri(), stack["state"]["state_dir"])  # the approver's own password again
