"""Empty results as a live metric: the server counts every user it answered with no item, on
/v1/recommend and the Open Inference infer path alike (the chart's canary analysis divides it by
the users answered)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_checkpoints import random_tiny_checkpoint, serve_in_thread, wait_ready

from onerec.serve.app import ServerConfig, create_app


def counters(client) -> dict[str, float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {s.name: s.value for f in families for s in f.samples
            if s.name in ("onerec_empty_results_total", "onerec_recommended_users_total")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A random tiny model whose search finds nothing for a user without history (the search is
    wrapped after loading: which users a real model leaves empty is not what this counts)."""
    checkpoint = random_tiny_checkpoint(tmp_path_factory.mktemp("empty") / "ckpt", seed=4, profile=False)
    app = create_app(ServerConfig(model_uri=str(checkpoint), model_version="1", device="cpu", max_users=8,
                                  max_beam=16, default_k=4, default_beam=8, max_wait_ms=0))
    with serve_in_thread(app) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        wait_ready(client, url)
        served = app.state.server.served
        search = served.search

        def nothing_without_history(sids, mask, profile, beam, k):
            recs = search(sids, mask, profile, beam, k)
            items = recs.items.clone()
            items[~mask.bool().any(1)] = -1  # -1: no item in that slot
            return type(recs)(items, recs.scores)

        served.search = nothing_without_history
        yield client


def test_users_answered_without_items_are_counted_on_both_protocols(server):
    before = counters(server)
    assert before == {"onerec_empty_results_total": 0.0, "onerec_recommended_users_total": 0.0}

    v1 = server.post("/v1/recommend", json={"users": [{"history": [1, 2]}, {"history": []}, {"history": [3]}]})
    assert v1.status_code == 200, v1.text
    assert [len(u["items"]) > 0 for u in v1.json()["users"]] == [True, False, True]
    assert counters(server) == {"onerec_empty_results_total": 1.0, "onerec_recommended_users_total": 3.0}

    # Open Inference: two users without history (padding -1 only), one with
    history = {"name": "history", "datatype": "INT64", "shape": [3, 2], "data": [-1, -1, 5, 6, -1, -1]}
    v2 = server.post("/v2/models/onerec-v2-fp8/infer", json={"inputs": [history]})
    assert v2.status_code == 200, v2.text
    items = {t["name"]: t for t in v2.json()["outputs"]}["items"]["data"]
    assert [any(i >= 0 for i in items[r * 4:(r + 1) * 4]) for r in range(3)] == [False, True, False]
    assert counters(server) == {"onerec_empty_results_total": 3.0, "onerec_recommended_users_total": 6.0}

    # a refused request answers nobody: neither counter moves
    assert server.post("/v1/recommend", json={"users": [{"history": [1]}], "k": 9, "beam": 4}).status_code == 422
    assert counters(server) == {"onerec_empty_results_total": 3.0, "onerec_recommended_users_total": 6.0}
