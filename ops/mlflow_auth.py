"""The local stack's authenticated MLflow: accounts, their credential files, the approval guard.

MLflow runs its basic-auth app (`mlflow server --app-name basic-auth`) with the config this module
writes (MLFLOW_AUTH_CONFIG_PATH): users in <state_dir>/mlflow-auth/basic_auth.db, default
permission READ. Five accounts per state dir, passwords generated once into 0600 files under
<state_dir>/secrets/:

    admin            MLflow's own admin (user management only)
    onerec-pipeline  the pipeline's service account: creates runs, the registered model, versions
    approver         the one account allowed to decide `approval` on a version
    viewer           read-only (the default permission)
    onerec-serving   read-only: what `onerec-fp8 serve` downloads models:/ URIs with
                     (onerec.serve.mlflow_login finds its file, mlflow-serving.json)

MLflow's permissions are per registered model (READ/EDIT/MANAGE), not per tag, so the rule
"only approvers decide" is enforced by the server's authentication hook (`authenticate_and_guard`,
the config's authorization_function), which runs before MLflow's own permission check:

- setting or deleting the `approval` tag needs an account named in ONEREC_MLFLOW_APPROVERS
  (403 for everyone else, the admin and the service account included);
- a version may be created with `approval=pending` only (no one registers a pre-approved version);
- `approval_by` / `approval_at` are written by the server itself after an approver's successful
  call, and no API call may set or delete them: they record who decided.

An approver also needs EDIT on the registered model (MLflow's own check): `ensure_accounts` grants
it on every registered model ("*"). The viewer has READ only and is refused by MLflow as well.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path

ADMIN, SERVICE, APPROVER, VIEWER, SERVING = "admin", "onerec-pipeline", "approver", "viewer", "onerec-serving"
ACCOUNTS = {"admin": ADMIN, "service": SERVICE, "approver": APPROVER, "viewer": VIEWER,  # role -> username
            "serving": SERVING}
APPROVAL_TAG = "approval"
SERVER_TAGS = ("approval_by", "approval_at")  # written by the server only
APPROVERS_ENV = "ONEREC_MLFLOW_APPROVERS"
GUARD_FUNCTION = "ops.mlflow_auth:authenticate_and_guard"


def secrets_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "secrets"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600 from creation on, never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_private(path: Path, what: str, min_length: int) -> str:
    """The text of a secret file that only its owner can read; ValueError when others can, or when
    it is shorter than `min_length` characters (a truncated or placeholder secret)."""
    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path} is readable by other users; chmod 600 it")
    text = path.read_text().strip()
    if len(text) < min_length:
        raise ValueError(f"{path}: the {what} is too short (at least {min_length} characters)")
    return text


def credentials_file(state_dir: str | Path, role: str) -> Path:
    return secrets_dir(state_dir) / f"mlflow-{role}.json"


def credentials(state_dir: str | Path, role: str) -> dict:
    """{"username", "password"} of one account, generated (once) into its 0600 file."""
    path = credentials_file(state_dir, role)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        creds = {"username": ACCOUNTS[role], "password": secrets.token_urlsafe(18)}
        write_private(path, json.dumps(creds) + "\n")
        return creds


def secret_token(path: Path, nbytes: int = 32, fernet: bool = False) -> str:
    """A random token kept in a 0600 file: generated on first use, the same ever after.
    `fernet`: a Fernet key (32 random bytes, url-safe base64) instead of hex."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except OSError:
        pass
    token = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() if fernet else secrets.token_hex(nbytes)
    write_private(path, token + "\n")
    return token


def auth_config_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "mlflow-auth" / "basic_auth.ini"


def write_auth_config(state_dir: str | Path) -> Path:
    """The basic-auth config of the local server (no secret in it: the admin password goes by env)."""
    path = auth_config_path(state_dir)
    db = path.parent / "basic_auth.db"
    write_private(path, "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = sqlite:///{db}",
        f"admin_username = {ADMIN}",
        f"authorization_function = {GUARD_FUNCTION}",
        "grant_default_workspace_access = false",
        # MLflow hashes the password on every request (about 0.3 s of CPU each with its default
        # hash): remember a verified login for a minute, in memory, keyed by an HMAC of it
        "auth_cache_ttl_seconds = 60",
        "",
    ]))
    return path


def server_env(state_dir: str | Path) -> dict[str, str]:
    """What the MLflow server process needs: the auth config, the first-start admin password, approvers."""
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(state_dir)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": credentials(state_dir, "admin")["password"],
        # the UI's CSRF protection signs with this; one per state dir so restarts keep sessions
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_token(secrets_dir(state_dir) / "mlflow-flask-secret"),
        # encrypts the webhooks' signing secrets in its database: without a fixed key MLflow draws
        # one per process and cannot read its own webhooks after a restart
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": secret_token(secrets_dir(state_dir) / "mlflow-webhook-key", fernet=True),
        APPROVERS_ENV: APPROVER,
        # the approval webhook posts to the relay on loopback (plain http there; signed deliveries)
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    }


def ensure_accounts(url: str, state_dir: str | Path, timeout: float = 30.0) -> dict[str, str]:
    """Create (or reset to its file's password) every non-admin account; returns role -> username."""
    import httpx

    from onerec.errors import UserError

    admin = credentials(state_dir, "admin")
    auth = (admin["username"], admin["password"])
    with httpx.Client(base_url=url, auth=auth, timeout=timeout, trust_env=False) as http:
        check = http.get("/api/2.0/mlflow/users/get", params={"username": ADMIN})
        if check.status_code == 401:
            raise UserError(f"MLflow refuses the admin password in {credentials_file(state_dir, 'admin')}: "
                            f"the auth database {auth_config_path(state_dir).parent} predates it; "
                            "remove that folder and start the stack again")
        check.raise_for_status()
        for role in ("service", "approver", "viewer", "serving"):
            creds = credentials(state_dir, role)
            created = http.post("/api/2.0/mlflow/users/create", json=creds)
            if created.status_code != 200:
                http.patch("/api/2.0/mlflow/users/update-password", json=creds).raise_for_status()
        # EDIT on every registered model, present and future: MLflow's half of the approver's right
        granted = http.post("/api/3.0/mlflow/users/permissions/grant", json={
            "username": APPROVER, "resource_type": "registered_model", "resource_id": "*", "permission": "EDIT",
        })
        if not _already_exists(granted):  # a restart on a kept auth database finds the grant there
            granted.raise_for_status()
    return {role: ACCOUNTS[role] for role in ACCOUNTS}


def _already_exists(reply) -> bool:
    try:
        return reply.status_code == 400 and reply.json().get("error_code") == "RESOURCE_ALREADY_EXISTS"
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Inside the MLflow server: authentication + the approval rule


def _approvers() -> set[str]:
    return {name.strip() for name in os.environ.get(APPROVERS_ENV, "").split(",") if name.strip()}


def _refuse(message: str):
    from flask import Response

    body = json.dumps({"error_code": "PERMISSION_DENIED", "message": message})
    return Response(body, status=403, mimetype="application/json")


def _request_fields() -> dict:
    from flask import request

    body = request.get_json(silent=True)
    fields = dict(request.args.items())
    if isinstance(body, dict):
        fields.update(body)
    return fields


def authenticate_and_guard():
    """MLflow's basic auth, then the approval rule (see the module docstring)."""
    from flask import after_this_request, request
    from mlflow.server.auth import authenticate_request_basic_auth
    from werkzeug.datastructures import Authorization

    authorization = authenticate_request_basic_auth()
    if not isinstance(authorization, Authorization) or request.method not in ("POST", "DELETE", "PATCH"):
        return authorization
    path, user = request.path, authorization.username
    if path.endswith("/mlflow/model-versions/create"):
        for tag in _request_fields().get("tags") or []:
            key, value = str(tag.get("key", "")), str(tag.get("value", ""))
            if key in SERVER_TAGS or (key == APPROVAL_TAG and value.strip().lower() != "pending"):
                return _refuse(f"a new version may carry {APPROVAL_TAG}=pending only, not {key}={value!r}")
        return authorization
    if not path.endswith(("/mlflow/model-versions/set-tag", "/mlflow/model-versions/delete-tag")):
        return authorization
    fields = _request_fields()
    key = str(fields.get("key", ""))
    if key in SERVER_TAGS:
        return _refuse(f"{key} is written by the server when an approver decides; it cannot be set or deleted")
    if key != APPROVAL_TAG:
        return authorization
    if user not in _approvers():
        return _refuse(f"only an approver ({', '.join(sorted(_approvers())) or 'none configured'}) may set "
                       f"or delete {APPROVAL_TAG}; {user} is not one")
    name, version = str(fields.get("name", "")), str(fields.get("version", ""))

    @after_this_request
    def record_approver(response):
        if response.status_code == 200:
            import datetime as dt

            from mlflow.entities.model_registry import ModelVersionTag
            from mlflow.server.handlers import _get_model_registry_store

            store = _get_model_registry_store()
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            store.set_model_version_tag(name, version, ModelVersionTag("approval_by", user))
            store.set_model_version_tag(name, version, ModelVersionTag("approval_at", now))
        return response

    return authorization
