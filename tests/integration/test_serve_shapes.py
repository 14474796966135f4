"""Served beam widths over HTTP: a beam between widths is searched with the next served width (and
the answer says which), a beam wider than every served width is a 422 naming the widths, the
metadata reports the widths and the time to ready, and the flags are checked as one-line errors."""

from __future__ import annotations

import httpx
import pytest
from serving_checkpoints import random_tiny_checkpoint, serve_in_thread, wait_ready

from onerec.checkpoint import load_checkpoint
from onerec.errors import UserError
from onerec.generate import beam_search
from onerec.semantic_ids import SemanticIdIndex, encode_histories
from onerec.serve.app import ServerConfig, create_app
from onerec.serve.server import int_list


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_tiny_checkpoint(tmp_path_factory.mktemp("shapes") / "ckpt", seed=3, profile=False)


def test_beams_round_up_to_a_served_width_and_wider_ones_are_refused(checkpoint):
    model, table = load_checkpoint(checkpoint)
    index = SemanticIdIndex.build(table, model.cfg.codebook_size)
    history = [int(i) for i in (table >= 0).all(1).nonzero()[0][:6]]
    config = ServerConfig(model_uri=str(checkpoint), device="cpu", default_k=4, default_beam=8,
                          beam_widths=(8, 16), max_wait_ms=1)
    with serve_in_thread(create_app(config)) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, url)
        r = client.post("/v1/recommend", json={"users": [{"history": history}], "k": 3, "beam": 5})
        assert r.status_code == 200 and r.json()["beam"] == 8
        sids, mask, _ = encode_histories([history], table, model.cfg.context_len)
        want = beam_search(model.float(), sids, mask, index, beam_size=8, k=3)
        assert r.json()["users"][0]["items"] == want.items[0].tolist()
        r = client.post("/v1/recommend", json={"users": [{"history": history}], "k": 3, "beam": 17})
        assert r.status_code == 422 and "[8, 16]" in r.json()["error"]
        meta = client.get("/v2/models/onerec-v2-fp8").json()["parameters"]
        assert meta["beam_widths"] == [8, 16] and meta["startup_seconds"] > 0
        assert meta["cuda_graphs"]["graphs"] == 0  # CPU: the reference search, nothing to capture
        metrics = client.get("/metrics").text
        assert "onerec_startup_seconds" in metrics and "onerec_cuda_graph_memory_bytes" in metrics


@pytest.mark.parametrize("widths, default_beam, message", [
    ((8, 600), 8, "beam_widths"), ((4,), 8, "default_beam"), ((), 8, None),
])
def test_bad_width_configs_are_one_line_errors(checkpoint, widths, default_beam, message):
    config = ServerConfig(model_uri=str(checkpoint), device="cpu", default_k=4, default_beam=default_beam,
                          beam_widths=widths or None)
    if message is None:
        config.validate()
        return
    with pytest.raises(UserError, match=message):
        config.validate()


def test_width_flags_parse_or_name_the_flag():
    assert int_list("128,512", "--beam-widths") == (128, 512)
    assert int_list(None, "--beam-widths") is None
    with pytest.raises(UserError, match="--history-buckets: expected comma-separated integers"):
        int_list("64,lots", "--history-buckets")
