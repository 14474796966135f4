"""The Open Inference Protocol (KServe v2 REST) on the real server, spoken by Triton's HTTP client.

tritonclient.http builds its requests from the model metadata the server advertises and parses
the answers itself: a tensor the metadata names but infer refuses (or the other way round) fails
here. The answers must be what /v1/recommend says for the same users.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_checkpoints import serve_in_thread, wait_ready
from tritonclient.utils import InferenceServerException

from onerec.checkpoint import load_checkpoint
from onerec.serve.app import ServerConfig, create_app

MODEL = "onerec-v2-fp8"
MAX_USERS = 4


@pytest.fixture(scope="module")
def served(trained_tiny):
    config = ServerConfig(model_uri=str(trained_tiny.checkpoint_dir), model_version="3", device="cpu",
                          max_users=MAX_USERS, max_beam=32, default_k=5, default_beam=16, max_wait_ms=5)
    with serve_in_thread(create_app(config)) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        wait_ready(client, url)
        triton_client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
        try:
            yield client, triton_client
        finally:
            triton_client.close()


@pytest.fixture(scope="module")
def model(trained_tiny):
    model, table = load_checkpoint(trained_tiny.checkpoint_dir)
    return model, np.flatnonzero((table >= 0).all(1))


def padded(histories: list[list[int]], pad: int) -> np.ndarray:
    out = np.full((len(histories), max(map(len, histories))), pad, np.int64)
    for i, h in enumerate(histories):
        out[i, : len(h)] = h
    return out


def test_a_protocol_client_gets_what_recommend_answers(served, model):
    client, tc = served
    cfg, ids = model[0].cfg, model[1]
    assert tc.is_server_live() and tc.is_server_ready() and tc.is_model_ready(MODEL)
    meta = tc.get_model_metadata(MODEL)
    assert meta["versions"] == ["3"]
    tensors = {t["name"]: t for t in meta["inputs"]}
    assert set(tensors) == {"history", "profile"}  # the tiny model has numeric features only
    assert tensors["profile"]["shape"] == [-1, len(cfg.profile_features)]
    pad = meta["parameters"]["history_padding"]

    histories = [[int(i) for i in ids[:12]], [int(i) for i in ids[20:23]], []]
    profiles = [{n: 1.5 + j for j, n in enumerate(cfg.profile_features)}, {n: -0.5 for n in cfg.profile_features},
                {n: 0.0 for n in cfg.profile_features}]
    history = triton.InferInput("history", [3, 12], tensors["history"]["datatype"])
    history.set_data_from_numpy(padded(histories, pad), binary_data=False)
    profile = triton.InferInput("profile", [3, len(cfg.profile_features)], tensors["profile"]["datatype"])
    profile.set_data_from_numpy(np.array([[p[n] for n in meta["parameters"]["profile_features"]] for p in profiles],
                                         np.float32), binary_data=False)
    outputs = [triton.InferRequestedOutput(t["name"], binary_data=False) for t in meta["outputs"]]
    result = tc.infer(MODEL, [history, profile], outputs=outputs, request_id="r-1", parameters={"k": 6, "beam": 24})

    answer = result.get_response()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (MODEL, "3", "r-1")
    assert answer["parameters"]["k"] == 6 and answer["parameters"]["beam"] == 24
    items, scores = result.as_numpy("items"), result.as_numpy("scores")
    assert items.dtype == np.int64 and scores.dtype == np.float32 and items.shape == scores.shape == (3, 6)
    v1 = client.post("/v1/recommend", json={"users": [{"history": h, "profile": p} for h, p in zip(
        histories, profiles, strict=True)], "k": 6, "beam": 24})
    assert v1.status_code == 200, v1.text
    for i, user in enumerate(v1.json()["users"]):
        n = len(user["items"])
        assert items[i, :n].tolist() == user["items"]
        np.testing.assert_allclose(scores[i, :n], user["scores"], rtol=1e-5, atol=1e-5)
        assert (items[i, n:] == -1).all()
    assert result.as_numpy("unknown_items").tolist() == [0, 0, 0]

    # only the outputs asked for; without a profile every user takes the training means
    history = triton.InferInput("history", [1, 12], "INT64")
    history.set_data_from_numpy(padded(histories[:1], pad), binary_data=False)
    only_items = tc.infer(MODEL, [history], outputs=[triton.InferRequestedOutput("items", binary_data=False)])
    assert [o["name"] for o in only_items.get_response()["outputs"]] == ["items"]
    means = {n: float(m) for n, m in zip(cfg.profile_features, model[0].context.profile_mean.tolist(), strict=True)}
    v1 = client.post("/v1/recommend", json={"users": [{"history": histories[0], "profile": means}]}).json()
    assert only_items.as_numpy("items")[0].tolist() == v1["users"][0]["items"]  # the server's default k


def test_the_binary_extension_is_refused_with_a_clear_error(served, model):
    _, tc = served
    history = triton.InferInput("history", [1, 3], "INT64")
    history.set_data_from_numpy(np.array([[int(i) for i in model[1][:3]]], np.int64))  # binary by default
    with pytest.raises(InferenceServerException, match="binary tensor data is not supported"):
        tc.infer(MODEL, [history])
    assert tc.get_server_metadata()["extensions"] == []


def infer(client, body, name=MODEL, **kw):
    return client.post(f"/v2/models/{name}/infer", content=body if isinstance(body, (str, bytes)) else json.dumps(body),
                       **kw)


def hist(data, shape=None, datatype="INT64"):
    return {"name": "history", "datatype": datatype, "shape": shape or [1, len(data)], "data": data}


BAD = [
    ({"inputs": [hist([1, 2], [1, 3])]}, 422, "needs 3 values"),
    ({"inputs": [hist([1, 2], datatype="INT32")]}, 422, "datatype must be INT64"),
    ({"inputs": [hist([1, 2], [2])]}, 422, "2 dimensions"),
    ({"inputs": [hist([1, -2])]}, 422, "-1 is padding"),
    ({"inputs": [hist([1, 2.5])]}, 422, "integers"),
    ({"inputs": [hist([1, True])]}, 422, "integers"),
    ({"inputs": [hist([1, 2**63])]}, 422, "int64"),
    ({"inputs": [hist([1] * (MAX_USERS + 1), [MAX_USERS + 1, 1])]}, 422, "users"),
    ({"inputs": [hist([], [0, 0])]}, 422, "users"),
    ({"inputs": [hist([1]), hist([2])]}, 422, "twice"),
    ({"inputs": [{"name": "age", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}, 422, "unknown input"),
    ({"inputs": [{"name": "profile", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}, 422, "required"),
    ({"inputs": [hist([1]), {"name": "profile", "datatype": "FP32", "shape": [1, 99], "data": [0] * 99}]}, 422,
     "dimension 1"),
    (lambda p: {"inputs": [hist([1, 2], [2, 1]), {"name": "profile", "datatype": "FP32", "shape": [1, p],
                                                  "data": [0] * p}]}, 422, "rows for 2 users"),
    (lambda p: '{"inputs": [{"name": "history", "datatype": "INT64", "shape": [1, 1], "data": [1]}, '
     f'{{"name": "profile", "datatype": "FP32", "shape": [1, {p}], "data": [NaN{", 1" * (p - 1)}]}}]}}', 422, "finite"),
    (lambda p: {"inputs": [hist([1]), {"name": "profile", "datatype": "FP32", "shape": [1, p], "data": [1e39] * p}]},
     422, "within float32"),
    ({"inputs": [hist([[[[[1]]]]], [1, 1])]}, 422, "nested deeper"),
    ({"inputs": [hist([1])], "parameters": {"k": 9, "beam": 4}}, 422, "must not exceed"),
    ({"inputs": [hist([1])], "parameters": {"beam": 33}}, 422, "maximum"),
    ({"inputs": [hist([1])], "parameters": {"temperature": 1}}, 422, "parameters"),
    ({"inputs": [hist([1])], "outputs": [{"name": "logits"}]}, 422, "unknown outputs"),
    ({"inputs": [hist([1])], "outputs": [{"name": "items", "parameters": {"binary_data": True}}]}, 400, "binary"),
    ({"inputs": []}, 422, "inputs"),
    ({}, 422, "inputs"),
    ("{", 400, "not valid JSON"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_tensors_get_a_4xx_that_says_why(served, model, body, status, message):
    client, _ = served
    r = infer(client, body(len(model[0].cfg.profile_features)) if callable(body) else body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.json()


def test_nested_data_routes_limits_and_metrics(served, model):
    client, _ = served
    ids = [int(i) for i in model[1][:4]]
    flat = infer(client, {"inputs": [hist(ids[:2] + [-1, -1] + ids[2:], [2, 3])]})
    nested = infer(client, {"inputs": [hist([ids[:2] + [-1], [-1] + ids[2:]], [2, 3])]})
    assert flat.status_code == nested.status_code == 200, (flat.text, nested.text)
    assert flat.json()["outputs"] == nested.json()["outputs"]  # padding anywhere in a row
    assert infer(client, {"inputs": [hist([1])]}, name="other").status_code == 404
    assert infer(client, {"inputs": [hist([1])]}, headers={"content-type": "text/plain"}).status_code == 415
    big = json.dumps({"inputs": [hist(list(range(300_000)))]})
    assert infer(client, big).status_code == 413
    assert client.get(f"/v2/models/{MODEL}/infer").status_code == 405
    text = client.get("/metrics").text
    assert 'onerec_http_responses_total{code="200",route="/v2/models/{name}/infer"}' in text
    assert 'onerec_http_responses_total{code="413",route="/v2/models/{name}/infer"}' in text


tensor = st.fixed_dictionaries({
    "name": st.sampled_from(["history", "profile", "x"]), "datatype": st.sampled_from(["INT64", "FP32", "BYTES"]),
    "shape": st.lists(st.integers(-1, 5), max_size=3),
    "data": st.recursive(st.one_of(st.integers(-3, 300), st.floats(), st.text(max_size=3)),
                         lambda inner: st.lists(inner, max_size=5), max_leaves=20),
})
body = st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=3)}, optional={
    "parameters": st.dictionaries(st.sampled_from(["k", "beam", "x"]), st.integers(-1, 40), max_size=2),
    "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["items", "scores", "x"])}), max_size=2),
})


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=body)
def test_fuzzed_infer_bodies_never_get_a_5xx(served, body):
    client, _ = served
    r = infer(client, body)
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        items = next(o for o in r.json()["outputs"] if o["name"] == "items") if "outputs" not in body or any(
            o["name"] == "items" for o in body["outputs"]) else None
        assert items is None or items["shape"][0] == next(t for t in body["inputs"] if t["name"] == "history")["shape"][0]
    else:
        assert r.json()["error"]
