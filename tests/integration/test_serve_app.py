"""The inference server over real HTTP (uvicorn on a loopback port): answers, strict validation, fuzz.

Serves the trained `tiny` checkpoint of the shared `trained_tiny` fixture (read-only), and its
FP8-quantized version.
"""

from __future__ import annotations

import json
import sys
import threading

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_checkpoints import (
    serve_in_thread,
    wait_ready,
)

from onerec.checkpoint import load_checkpoint
from onerec.generate import beam_search
from onerec.manifest import manifest_digest
from onerec.semantic_ids import SemanticIdIndex, encode_histories
from onerec.serve.app import SWITCH_INTERVAL_S, ServerConfig, create_app, prepare_user, run_users
from onerec.serve.model_store import load_served_model

MAX_USERS = 8
MAX_BEAM = 32
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def checkpoint(trained_tiny):
    return trained_tiny.checkpoint_dir


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, table = load_checkpoint(checkpoint)
    assert model.cfg.profile_features, "the served model should use profile features"
    return model, table, SemanticIdIndex.build(table, model.cfg.codebook_size)


def profile_vector(model, profile: dict | None) -> list[float]:
    """The profile the server should feed: given values, else the model's stored training mean."""
    means = model.context.profile_mean.tolist()
    return [float((profile or {}).get(n, m)) for n, m in zip(model.cfg.profile_features, means, strict=True)]


@pytest.fixture(scope="module")
def server(checkpoint):
    config = ServerConfig(
        model_uri=str(checkpoint), model_version="7", device="cpu", max_users=MAX_USERS, max_beam=MAX_BEAM,
        default_k=5, default_beam=16, max_body_bytes=MAX_BODY, max_batch_size=64, max_wait_ms=30,
    )
    before = sys.getswitchinterval()
    with serve_in_thread(create_app(config)) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        wait_ready(client, url)
        assert sys.getswitchinterval() == SWITCH_INTERVAL_S  # set for the batch thread while serving
        yield client
    assert sys.getswitchinterval() == before  # and given back at shutdown


def known_ids(table: np.ndarray) -> np.ndarray:
    return np.flatnonzero((table >= 0).all(1))


def post(client, body, **kw):
    return client.post("/v1/recommend", content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                       headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)


def expected(reference, history, k, beam, profile=None):
    """What the plain reference beam search says for one user, given the served defaults."""
    model, table, index = reference
    sids, mask, _ = encode_histories([history], table, model.cfg.context_len)
    recs = beam_search(model, sids, mask, index, torch.tensor([profile_vector(model, profile)]), beam_size=beam, k=k)
    valid = recs.items[0] >= 0
    return recs.items[0][valid].tolist(), recs.scores[0][valid].tolist()


def test_recommend_matches_the_reference_beam_search(server, reference):
    model, table, _ = reference
    ids = known_ids(table)
    history = [int(i) for i in ids[:12]]
    profile = {name: 1.5 + i for i, name in enumerate(model.cfg.profile_features)}
    r = post(server, {"users": [{"history": history, "profile": profile}], "k": 6, "beam": 24})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "onerec-v2-fp8", "version": "7", "kind": "bf16"}
    assert (body["k"], body["beam"]) == (6, 24)
    user = body["users"][0]
    items, scores = expected(reference, history, 6, 24, profile)
    assert user["items"] == items
    np.testing.assert_allclose(user["scores"], scores, rtol=1e-5, atol=1e-5)
    assert user["scores"] == sorted(user["scores"], reverse=True)
    assert set(user["items"]) <= set(ids.tolist())  # only existing items are generated
    assert (user["unknown_items"], user["truncated_items"], user["filled_profile_features"]) == (0, 0, 0)


def test_unknown_ids_dropped_long_history_keeps_newest_missing_profile_filled(server, reference):
    model, table, _ = reference
    ids = [int(i) for i in known_ids(table)]
    gaps = np.flatnonzero((table < 0).all(1))  # ids inside the table's range that the model does not know
    unknown = [int(gaps[0]) if len(gaps) else len(table) + 2, len(table) + 5, 10**15]
    context = model.cfg.context_len
    history = ids[: context + 7] + unknown  # 7 known items too many, plus 3 unknown ones
    first = model.cfg.profile_features[0]
    r = post(server, {"users": [{"history": history, "profile": {first: 25.5, "not_a_feature": 3.0}}]})
    assert r.status_code == 200, r.text
    body = r.json()
    user = body["users"][0]
    assert (body["k"], body["beam"]) == (5, 16)  # the server's defaults
    assert user["unknown_items"] == 3
    assert user["truncated_items"] == 7
    # the features the user lacked took the model's training mean
    assert user["filled_profile_features"] == len(model.cfg.profile_features) - 1
    assert user["ignored_profile_features"] == 1
    # the same answer as the newest `context` known items with the other features at their mean
    items, _ = expected(reference, ids[7 : context + 7], 5, 16, {first: 25.5})
    assert user["items"] == items


def test_empty_history_and_no_profile_are_served(server, reference):
    r = post(server, {"users": [{"history": []}, {"history": [], "profile": {}}], "k": 3, "beam": 3})
    assert r.status_code == 200, r.text
    users = r.json()["users"]
    assert len(users) == 2 and users[0]["items"] == users[1]["items"] and len(users[0]["items"]) == 3
    assert users[0]["filled_profile_features"] == len(reference[0].cfg.profile_features)


BAD_BODIES = [
    ({"users": [{"history": [1]}], "extra": 1}, 422),
    ({"users": [{"history": [1], "age": 3}]}, 422),
    ({"users": [{"history": [-1]}]}, 422),
    ({"users": [{"history": [1.5]}]}, 422),
    ({"users": [{"history": [2.0]}]}, 422),
    ({"users": [{"history": [True]}]}, 422),
    ({"users": [{"history": ["3"]}]}, 422),
    ({"users": [{"history": [2**63]}]}, 422),
    ({"users": [{"history": "1,2"}]}, 422),
    ({"users": [{}]}, 422),
    ({"users": []}, 422),
    ({"users": {"history": [1]}}, 422),
    ({}, 422),
    ([], 422),
    ({"users": [{"history": [1]}], "k": 0}, 422),
    ({"users": [{"history": [1]}], "k": 5, "beam": 4}, 422),
    ({"users": [{"history": [1]}], "k": "5"}, 422),
    ({"users": [{"history": [1]}], "beam": MAX_BEAM + 1}, 422),
    ({"users": [{"history": [1]}], "k": MAX_BEAM + 1}, 422),
    ({"users": [{"history": [1]}] * (MAX_USERS + 1)}, 422),
    ({"users": [{"history": [1], "profile": {"age": "old"}}]}, 422),
    ({"users": [{"history": [1], "profile": {"age": None}}]}, 422),
    ({"users": [{"history": [1], "profile": [1, 2]}]}, 422),
    ('{"users": [{"history": [1], "profile": {"age": NaN}}]}', 422),
    ('{"users": [{"history": [1], "profile": {"age": 1e999}}]}', 422),
    ('{"users": [{"history": [1]}', 400),
    (b"\xff\xfe\x00", 400),
    ("", 400),
    ("[" * 5000, 400),
]


@pytest.mark.parametrize(("body", "status"), BAD_BODIES)
def test_invalid_bodies_get_a_4xx_with_a_message(server, body, status):
    r = post(server, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]


def test_oversized_bodies_are_refused_before_parsing(server):
    big = json.dumps({"users": [{"history": list(range(20_000))}]})
    assert len(big) > MAX_BODY
    r = post(server, big)
    assert r.status_code == 413 and "larger than" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(200):
            yield b" " * 1024

    r = server.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_wrong_content_type_and_method(server):
    r = server.post("/v1/recommend", content=b'{"users": [{"history": [1]}]}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert server.get("/v1/recommend").status_code == 405


def test_health_metadata_and_metrics(server, checkpoint, reference):
    assert server.get("/v2/health/live").json() == {"live": True}
    assert server.get("/v2/health/ready").json() == {"ready": True}
    meta = server.get("/v2/models/onerec-v2-fp8").json()
    assert meta["versions"] == ["7"] and meta["parameters"]["profile_features"] == reference[0].cfg.profile_features
    assert meta["parameters"]["digest"] == manifest_digest(checkpoint)
    assert server.get("/v2/models/other").status_code == 404
    post(server, {"users": [{"history": [-5]}]})  # one 422 for the error counter
    text = server.get("/metrics").text
    for name in ("onerec_request_duration_seconds_bucket", "onerec_batch_size_users_bucket",
                 'onerec_http_errors_total{code="422"}', "onerec_ready 1.0", "onerec_gc_pause_seconds"):
        assert name in text, name
    batches = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("onerec_batch_seconds_count "))
    assert batches >= 1  # the warm-up request's batch at least
    assert 'onerec_model_info{backend="reference"' in text and 'version="7"' in text


# --- property-based fuzz: nothing a client sends makes the server answer 5xx ----------------------

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
plausible_user = st.fixed_dictionaries(
    {"history": st.one_of(st.lists(st.integers(min_value=-3, max_value=400), max_size=60), json_value)},
    optional={"profile": st.one_of(st.dictionaries(st.sampled_from(["age", "activity", "x"]), st.one_of(st.floats(), json_value),
                                                   max_size=3), json_value),
              "bogus": json_value},
)
plausible_body = st.fixed_dictionaries(
    {"users": st.one_of(st.lists(plausible_user, max_size=MAX_USERS + 2), json_value)},
    optional={"k": st.one_of(st.integers(min_value=-2, max_value=MAX_BEAM + 2), json_value),
              "beam": st.one_of(st.integers(min_value=-2, max_value=MAX_BEAM + 2), json_value)},
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(plausible_body, json_value, st.binary(max_size=64)))
def test_fuzzed_bodies_never_get_a_5xx(server, body):
    r = post(server, body if isinstance(body, bytes) else json.dumps(body))
    assert r.status_code < 500, r.text
    payload = r.json()
    if r.status_code == 200:
        assert len(payload["users"]) == len(body["users"])
        for user in payload["users"]:
            assert len(user["items"]) == len(user["scores"]) <= payload["k"]
    else:
        assert 400 <= r.status_code < 500 and payload["error"]


# --- dynamic batching ---------------------------------------------------------------------------


def test_concurrent_callers_each_get_their_own_answer(server, reference):
    _, table, _ = reference
    ids = known_ids(table)
    rng = np.random.default_rng(0)
    first = reference[0].cfg.profile_features[0]
    bodies = [
        {"users": [{"history": [int(i) for i in rng.choice(ids, size=int(rng.integers(0, 40)))],
                    "profile": {first: float(rng.uniform(-2, 2))}}], "k": 4, "beam": 16}
        for _ in range(12)
    ]
    singles = [post(server, b).json()["users"][0] for b in bodies]  # one at a time: no batch-mates

    def batches() -> float:
        line = next(l for l in server.get("/metrics").text.splitlines() if l.startswith("onerec_batch_size_users_count"))
        return float(line.split()[-1])

    before = batches()
    answers: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def call(i):
        with httpx.Client(base_url=str(server.base_url), timeout=60) as c:
            barrier.wait()
            answers[i] = post(c, bodies[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert batches() - before < len(bodies), "concurrent requests were not batched"
    for single, answer in zip(singles, answers, strict=True):
        assert answer.status_code == 200
        mine = answer.json()["users"][0]
        assert mine["items"] == single["items"]
        np.testing.assert_allclose(mine["scores"], single["scores"], rtol=1e-4, atol=1e-4)


# --- the FP8 artifact ----------------------------------------------------------------------------


def test_a_quantized_folder_is_served_as_fp8(trained_tiny, tmp_path_factory, reference):
    from onerec.quant.export import load_quantized
    from onerec.quant.export import quantize_folder as quantize

    out = tmp_path_factory.mktemp("fp8") / "quantized"
    quantize(str(trained_tiny.checkpoint_dir), str(trained_tiny.calibration_path), "fp8_dynamic", str(out))
    served = load_served_model(str(out), "cpu", version="5")
    assert (served.kind, served.version, served.backend) == ("fp8", "5", "reference")
    assert served.recipe["recipe"]["name"] == "fp8_dynamic"
    model, table, _ = load_quantized(out)
    index = SemanticIdIndex.build(table, model.cfg.codebook_size)
    history = [int(i) for i in known_ids(table)[:20]]
    (got,) = run_users(served, [prepare_user(served, history, None)], 5, 16)
    sids, mask, _ = encode_histories([history], table, model.cfg.context_len)
    want = beam_search(model, sids, mask, index, torch.tensor([profile_vector(model, None)]), beam_size=16, k=5)
    assert got.items == want.items[0].tolist()
    np.testing.assert_allclose(got.scores, want.scores[0].tolist(), rtol=1e-5, atol=1e-5)
