"""The local endpoint's admin switch needs the token from its 0600 file; without it nothing changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from starlette.testclient import TestClient

from ops.rollout.proxy import create_proxy_app, read_token

TOKEN = "t" * 32


def test_switch_without_the_token_is_refused_and_changes_nothing(tmp_path):
    state_file = tmp_path / "proxy-upstream.json"
    with TestClient(create_proxy_app(state_file, TOKEN)) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            reply = http.put("/_proxy/upstream", json={"url": "http://127.0.0.1:9"}, headers=headers)
            assert reply.status_code == 401, headers
        assert http.get("/_proxy/status").json()["upstream"] is None and not state_file.exists()
        ok = http.put("/_proxy/upstream", json={"url": "http://127.0.0.1:9"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and json.loads(state_file.read_text())["upstream"] == "http://127.0.0.1:9"


def test_proxy_refuses_a_token_file_others_can_read(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o644)
    result = subprocess.run([sys.executable, "-m", "ops.rollout.proxy", "--port", "9", "--state-file",
                             str(tmp_path / "state.json"), "--token-file", str(token_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "chmod 600" in result.stderr and "Traceback" not in result.stderr
    os.chmod(token_file, 0o600)
    assert read_token(token_file) == TOKEN


def test_every_secret_reader_refuses_files_others_can_read_and_short_secrets(tmp_path):
    """The relay's webhook secret and the provenance key go through the same check as the token."""
    from tasks.config import PipelineConfig
    from tasks.errors import ProvenanceError
    from tasks.provenance import load_key

    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    os.chmod(secret, 0o640)
    relay = subprocess.run([sys.executable, "-m", "ops.approval_relay", "--port", "9", "--secret-file", str(secret)],
                           capture_output=True, text=True, timeout=60)
    assert relay.returncode == 2 and "chmod 600" in relay.stderr and "Traceback" not in relay.stderr
    cfg = PipelineConfig.from_env({"ONEREC_PROVENANCE_KEY_FILE": str(secret)})
    with pytest.raises(ProvenanceError, match="chmod 600"):
        load_key(cfg)
    os.chmod(secret, 0o600)
    secret.write_text("short")
    with pytest.raises(ProvenanceError, match="too short"):
        load_key(cfg)
    secret.write_text("k" * 40)
    assert load_key(cfg) == b"k" * 40
