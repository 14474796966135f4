"""What the local stack's servers need across restarts is generated once and kept; a failed start is one line."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from onerec.errors import UserError


def test_mlflow_gets_the_same_webhook_encryption_key_on_every_start(tmp_path):
    """Without a fixed key MLflow draws one per process and cannot read its webhooks after a restart."""
    from cryptography.fernet import Fernet

    from ops.mlflow_auth import secrets_dir, server_env

    first, second = server_env(tmp_path), server_env(tmp_path)
    key = first["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]
    assert key == second["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]
    assert first["MLFLOW_FLASK_SERVER_SECRET_KEY"] == second["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    secret = b"webhook signing secret"
    assert Fernet(key.encode()).decrypt(Fernet(key.encode()).encrypt(secret)) == secret  # a valid Fernet key
    path = secrets_dir(tmp_path) / "mlflow-webhook-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == key


def test_an_unexpected_error_during_a_start_is_one_line_naming_the_service_and_its_logs(tmp_path, monkeypatch):
    from ops import stack

    def webhook_list_fails(cfg, port, env):
        raise RuntimeError("Server error '500 INTERNAL SERVER ERROR' for url '/api/2.0/mlflow/webhooks'")

    monkeypatch.setitem(stack._STARTERS, "relay", webhook_list_fails)
    with pytest.raises(UserError) as failed:
        stack._start_timed(stack.StackConfig.from_env({}, state_dir=tmp_path), "relay", 1, {})
    message = str(failed.value)
    assert message.startswith("relay did not start (RuntimeError: Server error '500")
    assert str(tmp_path / "logs" / "relay.log") in message and str(tmp_path / "logs" / "mlflow.log") in message
    assert "\n" not in message


def test_the_ports_of_the_last_start_come_back_after_a_down(tmp_path, monkeypatch):
    from ops import stack

    cfg = stack.StackConfig.from_env({}, state_dir=tmp_path)
    assert stack._resolve_ports(cfg) == stack.DEFAULT_PORTS
    (tmp_path / "ports.json").write_text('{"s3": 19000, "mlflow": 15000}')
    ports = stack._resolve_ports(cfg)
    assert (ports["s3"], ports["mlflow"], ports["airflow"]) == (19000, 15000, stack.DEFAULT_PORTS["airflow"])
    # the environment still decides over the last start
    assert stack._resolve_ports(stack.StackConfig.from_env({stack.PORT_ENV["s3"]: "19999"}, state_dir=tmp_path))["s3"] == 19999
    assert stack._resolve_ports(stack.StackConfig.from_env({}, state_dir=tmp_path, ports={"mlflow": 15555}))["mlflow"] == 15555


def test_the_banner_names_the_password_files_and_shows_no_password(tmp_path, capsys):
    """The banner lands in terminals and CI logs: it says where each password is, never the password."""
    from ops import mlflow_auth, stack

    cfg = stack.StackConfig.from_env({}, state_dir=tmp_path)
    airflow_file, airflow_password = stack._airflow_password(cfg)
    accounts = {role: {**mlflow_auth.credentials(tmp_path, role),
                       "file": str(mlflow_auth.credentials_file(tmp_path, role))} for role in mlflow_auth.ACCOUNTS}
    state = {
        "state_dir": str(tmp_path), "stop_command": "onerec-fp8 stack down",
        "services": {"airflow": {"url": "http://127.0.0.1:8080"}, "mlflow": {"url": "http://127.0.0.1:5000"}},
        "credentials": {"airflow": {"username": "admin", "password": airflow_password,
                                    "passwords_file": str(airflow_file)}, "mlflow": accounts},
    }
    stack._print_banner(state)
    banner = capsys.readouterr().err
    passwords = [airflow_password, *(a["password"] for a in accounts.values())]
    assert all(len(p) >= 12 and p not in banner for p in passwords)
    for path in (airflow_file, accounts["approver"]["file"], accounts["viewer"]["file"]):
        assert str(path) in banner and stat.S_IMODE(Path(path).stat().st_mode) == 0o600


def test_the_printed_state_holds_no_password_at_any_depth():
    from ops import stack

    state = {"services": {}, "credentials": {
        "airflow": {"username": "admin", "password": "a" * 16, "passwords_file": "/s/airflow.json"},
        "mlflow": {"approver": {"username": "approver", "password": "b" * 16, "file": "/s/approver.json"}},
        "future": {"nested": {"deeper": {"password": "c" * 16, "file": "/s/f.json"}}}}}
    printed = stack.without_passwords(state)
    assert "password" not in str(printed).replace("passwords_file", "")
    assert printed["credentials"]["mlflow"]["approver"] == {"username": "approver", "file": "/s/approver.json"}
    assert printed["credentials"]["airflow"]["passwords_file"] == "/s/airflow.json"
    assert state["credentials"]["airflow"]["password"] == "a" * 16  # the state itself is left as it was
