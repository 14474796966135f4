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

MLflow's permissions are per registered model (READ/EDIT/MANAGE), not per tag, so the registry's
rules are enforced by the server's authentication hook (`authenticate_and_guard`, the config's
authorization_function), which runs before MLflow's own permission check. It decides on exactly
what MLflow will apply: a registry write (POST/PATCH/PUT/DELETE under registered-models/ or
model-versions/) must have no query parameter and an empty body or a JSON object (MLflow itself
reads any body as JSON and decodes a JSON string twice; the hook answers 400 to all of that). Then:

- setting or deleting the `approval` tag needs an account named in ONEREC_MLFLOW_APPROVERS that is
  not an MLflow admin (403 for everyone else, the admin and the service account included);
- an approver changes nothing else in the registry (no other tag, description, alias or delete);
- renaming or deleting a registered model needs the admin account;
- a version may be created with `approval=pending` only (no one registers a pre-approved version);
- `approval_by` / `approval_at` are written by the server itself after an approver's successful
  call, and no API call may set or delete them: they record who decided;
- `state_sequence` (the newest state record's sequence, tasks.approval) only grows: it cannot be
  lowered, repeated or deleted, and a version that has it is deleted by the admin only;
- every change to accounts or permissions is a line `account change by USER: ...` in the server's
  log (passwords left out): an account becomes an approver only through such a logged change.

An approver also needs EDIT on the registered model (MLflow's own check): `ensure_accounts` grants
it on every registered model ("*"). The viewer has READ only and is refused by MLflow as well.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from pathlib import Path

from onerec.errors import UserError

ADMIN, SERVICE, APPROVER, VIEWER, SERVING = "admin", "onerec-pipeline", "approver", "viewer", "onerec-serving"
ACCOUNTS = {"admin": ADMIN, "service": SERVICE, "approver": APPROVER, "viewer": VIEWER,  # role -> username
            "serving": SERVING}
APPROVAL_TAG = "approval"
SERVER_TAGS = ("approval_by", "approval_at")  # written by the server only
STATE_SEQUENCE_TAG = "state_sequence"  # the newest state record's sequence number: only grows
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
    import httpx  # heavy: httpx, only where HTTP is spoken

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


def _reply(status: int, error_code: str, message: str):
    from flask import Response

    return Response(json.dumps({"error_code": error_code, "message": message}), status=status,
                    mimetype="application/json")


def _refuse(message: str):
    return _reply(403, "PERMISSION_DENIED", message)


class BadRequestBody(ValueError):
    """A registry write whose body or query the guard refuses to interpret (400)."""


def request_fields() -> dict:
    """The fields of a registry write, exactly as MLflow's handlers will apply them.

    MLflow reads a write's JSON body whatever its Content-Type, decodes a JSON string holding
    JSON a second time, and ignores the query string. Rather than follow each of those rules the
    guard accepts one shape only: an empty body or a JSON object, and no query parameter; so
    what it decides on is what MLflow applies.
    """
    from flask import request

    if request.args:
        raise BadRequestBody(f"query parameters are not accepted on {request.path} (send the fields in the JSON "
                             f"body): {sorted(request.args)}")
    data = request.get_data(cache=True)
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequestBody(f"the body of {request.path} is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequestBody(f"the body of {request.path} must be a JSON object, not a {type(body).__name__}")
    return body


def _is_admin(user: str) -> bool:
    from mlflow.server.auth import store  # heavy: MLflow

    try:
        return bool(store.get_user(user).is_admin)
    except Exception:  # an unknown user is not an admin  # noqa: BLE001
        return False


def _version_tags(name: str, version: str) -> dict[str, str]:
    from mlflow.server.handlers import _get_model_registry_store  # heavy: MLflow

    try:
        return dict(_get_model_registry_store().get_model_version(name, version).tags)
    except Exception:  # no such version: MLflow's handler answers that  # noqa: BLE001
        return {}


def _audit_account_change(user: str) -> None:
    """Every change to accounts and permissions is a line in the server log: how a grant is logged."""
    from flask import request

    try:
        fields = request_fields()
    except BadRequestBody:
        fields = {}
    shown = {k: v for k, v in fields.items() if "password" not in k}
    audit = logging.getLogger("onerec.mlflow_audit")
    if not audit.handlers:  # the server's stderr is its log file, whatever MLflow configures
        audit.addHandler(logging.StreamHandler())
        audit.propagate = False
    audit.warning("account change by %s: %s %s %s", user, request.method,
                                                    request.path, json.dumps(shown, sort_keys=True))


WRITE_METHODS = ("POST", "DELETE", "PATCH", "PUT")
REGISTRY_PATHS = ("/mlflow/registered-models/", "/mlflow/model-versions/")
VERSION_TAG_PATHS = ("/mlflow/model-versions/set-tag", "/mlflow/model-versions/delete-tag")
ADMIN_ONLY_PATHS = ("/mlflow/registered-models/rename", "/mlflow/registered-models/delete")
ACCOUNT_PATHS = ("/mlflow/users/", "/permissions/")


def authenticate_and_guard():
    """MLflow's basic auth, then the registry rules (see the module docstring)."""
    from flask import request
    from mlflow.server.auth import authenticate_request_basic_auth  # heavy: MLflow
    from werkzeug.datastructures import Authorization

    authorization = authenticate_request_basic_auth()
    if not isinstance(authorization, Authorization) or request.method not in WRITE_METHODS:
        return authorization
    path, user = request.path, authorization.username
    if any(marker in path for marker in ACCOUNT_PATHS):
        _audit_account_change(user)
        return authorization
    if not any(marker in path for marker in REGISTRY_PATHS):
        return authorization
    try:
        fields = request_fields()
    except BadRequestBody as exc:
        return _reply(400, "INVALID_PARAMETER_VALUE", str(exc))
    refusal = _registry_refusal(path, user, fields)
    if refusal:
        return _refuse(refusal)
    if path.endswith(VERSION_TAG_PATHS) and str(fields.get("key", "")) == APPROVAL_TAG:
        _record_approver(user, str(fields.get("name", "")), str(fields.get("version", "")))
    return authorization


def _registry_refusal(path: str, user: str, fields: dict) -> str | None:
    """Why this registry write is refused, or None (the rules of the module docstring)."""
    admin = _is_admin(user)
    approver = user in _approvers() and not admin
    key, value = str(fields.get("key", "")), str(fields.get("value", ""))
    if path.endswith(ADMIN_ONLY_PATHS) and not admin:
        return f"renaming or deleting a registered model needs the admin account; {user} is not it"
    if approver and not (path.endswith(VERSION_TAG_PATHS) and key == APPROVAL_TAG):
        return f"an approver ({user}) decides {APPROVAL_TAG} on a version and changes nothing else in the registry"
    if path.endswith("/mlflow/model-versions/create"):
        for tag in fields.get("tags") or []:
            tag = tag if isinstance(tag, dict) else {}
            tag_key, tag_value = str(tag.get("key", "")), str(tag.get("value", ""))
            if tag_key in (*SERVER_TAGS, STATE_SEQUENCE_TAG) or (
                    tag_key == APPROVAL_TAG and tag_value.strip().lower() != "pending"):
                return f"a new version may carry {APPROVAL_TAG}=pending only, not {tag_key}={tag_value!r}"
        return None
    name, version = str(fields.get("name", "")), str(fields.get("version", ""))
    if path.endswith("/mlflow/model-versions/delete"):
        if STATE_SEQUENCE_TAG in _version_tags(name, version) and not admin:
            return (f"{name} version {version} has a pipeline state record: only the admin account deletes it "
                    "(the pipeline deletes only a version it has not signed yet)")
        return None
    if not path.endswith(VERSION_TAG_PATHS):
        return None
    deleting = path.endswith("delete-tag")
    if key in SERVER_TAGS:
        return f"{key} is written by the server when an approver decides; it cannot be set or deleted"
    if key == APPROVAL_TAG and not approver:
        why = "an admin account is never an approver" if admin else "it is not one"
        return (f"only an approver ({', '.join(sorted(_approvers())) or 'none configured'}) may set or delete "
                f"{APPROVAL_TAG}; {user}: {why}")
    if key == STATE_SEQUENCE_TAG:
        current = _version_tags(name, version).get(STATE_SEQUENCE_TAG)
        if deleting:
            return f"{STATE_SEQUENCE_TAG} only grows: it cannot be deleted"
        if not value.isdigit() or (current is not None and current.isdigit() and int(value) <= int(current)):
            return f"{STATE_SEQUENCE_TAG} only grows: {value!r} does not follow {current!r}"
    return None


def _record_approver(user: str, name: str, version: str) -> None:
    """After an approver's successful call the server itself records who decided, and when."""
    from flask import after_this_request

    @after_this_request
    def record_approver(response):
        if response.status_code == 200:
            import datetime as dt

            from mlflow.entities.model_registry import ModelVersionTag  # heavy: MLflow
            from mlflow.server.handlers import _get_model_registry_store  # heavy: MLflow

            store = _get_model_registry_store()
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            store.set_model_version_tag(name, version, ModelVersionTag("approval_by", user))
            store.set_model_version_tag(name, version, ModelVersionTag("approval_at", now))
        return response
