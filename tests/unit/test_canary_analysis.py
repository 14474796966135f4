"""The canary's traffic split, mirroring and evidence in the serving proxy (real HTTP upstreams on
loopback), and the analysis that judges a step from that evidence."""

from __future__ import annotations

import time

import pytest
from serving_checkpoints import serve_in_thread
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from onerec.serve.app import ServerConfig
from ops.rollout.canary import ArmStats, CanaryConfig, MirrorStats, recommendations
from ops.rollout.proxy import create_proxy_app
from tasks.canary import judge, plot_canary

TOKEN = "t" * 32
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def upstream(items: list[int], scores: list[float], status: int = 200):
    """A stand-in inference server: every recommendation gets `items`, answered with `status`."""

    async def recommend(request):
        body = await request.json()
        if status != 200:
            return JSONResponse({"error": "broken"}, status_code=status)
        return JSONResponse({"model": {"version": str(items[-1])}, "users": [
            {"items": items, "scores": scores} for _ in body["users"]]})

    async def ready(request):
        return JSONResponse({"ready": True, "items": items})

    app = Starlette(routes=[Route("/v1/recommend", recommend, methods=["POST"]), Route("/v2/health/ready", ready)])
    app.state.config, app.state.metrics = ServerConfig(model_uri="unused"), None  # what serve_in_thread reads
    return app


@pytest.fixture
def servers():
    with serve_in_thread(upstream([1, 2, 3], [-1.0, -2.0, -3.0])) as (stable, _), \
            serve_in_thread(upstream([1, 2, 9], [-1.5, -2.0, -3.0])) as (good, _), \
            serve_in_thread(upstream([1], [-1.0], status=500)) as (broken, _):
        yield {"stable": stable, "canary": good, "broken": broken}


def wait_for_mirrors(http, n: int) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        canary = http.get("/_proxy/status").json()["canary"]
        if canary["mirror"]["compared"] + canary["mirror"]["failed"] + canary["mirror"]["dropped"] >= n:
            return canary
        time.sleep(0.05)
    raise TimeoutError("mirrored requests not compared")


def test_a_share_goes_to_the_canary_the_rest_is_mirrored_and_compared(servers, tmp_path):
    with TestClient(create_proxy_app(tmp_path / "state.json", TOKEN)) as http:
        http.put("/_proxy/upstream", json={"url": servers["stable"]}, headers=ADMIN).raise_for_status()
        assert http.put("/_proxy/canary", json={"url": servers["canary"], "weight": 30}).status_code == 401
        for bad in ({"url": servers["canary"], "weight": 101}, {"url": servers["canary"], "weight": True},
                    {"url": "http://example.com:80", "weight": 5}, {"url": servers["canary"]}):
            assert http.put("/_proxy/canary", json=bad, headers=ADMIN).status_code == 400, bad
        assert http.get("/_proxy/status").json()["canary"] is None
        http.put("/_proxy/canary", json={"url": servers["canary"], "weight": 30, "version": "9"},
                 headers=ADMIN).raise_for_status()
        versions = [http.post("/v1/recommend", json={"users": [{"history": [1]}]}).json()["model"]["version"]
                    for _ in range(300)]
        assert http.get("/v2/health/ready").json()["items"] == [1, 2, 3]  # never split: the upstream's
        canary = wait_for_mirrors(http, versions.count("3"))
        assert canary["canary"]["requests"] == versions.count("9") and canary["stable"]["requests"] == versions.count("3")
        assert 0.2 < versions.count("9") / 300 < 0.4  # 30% +- 3.5 standard deviations
        mirror = canary["mirror"]
        assert mirror["compared"] == versions.count("3") and mirror["failed"] == mirror["dropped"] == 0
        assert mirror["overlap_mean"] == pytest.approx(2 / 3) and mirror["score_shift_mean"] == pytest.approx(0.5)
        assert canary["canary"]["error_rate"] == 0 and canary["canary"]["p99_s"] > 0

        # a broken canary: its errors are counted, the mirrored comparisons fail; a new step starts afresh
        http.put("/_proxy/canary", json={"url": servers["broken"], "weight": 50}, headers=ADMIN).raise_for_status()
        codes = [http.post("/v1/recommend", json={"users": [{"history": [1]}]}).status_code for _ in range(60)]
        canary = wait_for_mirrors(http, codes.count(200))
        assert canary["canary"]["errors"] == codes.count(500) == canary["canary"]["requests"] > 0
        assert canary["mirror"]["failed"] == codes.count(200) and canary["mirror"]["compared"] == 0
        http.put("/_proxy/canary", json={"url": None}, headers=ADMIN).raise_for_status()
        assert all(http.post("/v1/recommend", json={"users": [{"history": [1]}]}).status_code == 200
                   for _ in range(20))
        assert http.get("/_proxy/status").json()["canary"] is None


def test_answers_of_both_protocols_are_read_and_compared():
    v1 = b'{"users": [{"items": [4, 5], "scores": [-1.0, -2.0]}, {"items": [], "scores": []}]}'
    v2 = (b'{"outputs": [{"name": "items", "datatype": "INT64", "shape": [2, 2], "data": [4, 6, -1, -1]},'
          b' {"name": "scores", "datatype": "FP32", "shape": [2, 2], "data": [-1.25, -2.0, -3e38, -3e38]}]}')
    assert recommendations(v1) == [([4, 5], [-1.0, -2.0]), ([], [])]
    assert recommendations(v2) == [([4, 6], [-1.25, -2.0]), ([], [])]
    assert recommendations(b'{"error": "x"}') is None and recommendations(b"not json") is None
    mirror = MirrorStats()
    mirror.compare(v1, v2)
    mirror.compare(v1, None)
    summary = mirror.summary()
    assert (summary["compared"], summary["failed"], summary["users"]) == (1, 1, 1)
    assert summary["overlap_mean"] == 0.5 and summary["score_shift_mean"] == 0.25
    # empty results per user answered, as the server counts them (onerec_empty_results_total)
    arm_stats = ArmStats()
    for status, body in ((200, v1), (200, v2), (500, b'{"error": "x"}'), (None, None)):
        arm_stats.observe(status, 0.01, body)
    got = arm_stats.summary()
    assert (got["requests"], got["errors"], got["users"], got["empty"]) == (4, 2, 4, 2) and got["empty_rate"] == 0.5


def arm(requests, errors=0, empty=0, p99=0.01, users_per_request=1):
    users = (requests - errors) * users_per_request
    return {"requests": requests, "errors": errors, "error_rate": errors / requests if requests else None,
            "users": users, "empty": empty, "empty_rate": empty / users if users else None, "p99_s": p99}


def evidence(canary, stable, overlap=0.95, shift=0.1, compared=100, failed=0):
    return {"canary": canary, "stable": stable, "mirror": {
        "compared": compared, "failed": failed, "dropped": 0, "users": compared, "overlap_mean": overlap,
        "overlap_min": overlap, "score_shift_mean": shift, "score_shift_max": shift}}


POLICY = CanaryConfig(weights=(5, 25, 100), min_requests=50, min_mirrored=50)


@pytest.mark.parametrize(("weight", "ev", "verdict", "reason"), [
    (5, evidence(arm(60), arm(900)), "passed", None),
    (5, evidence(arm(40), arm(900)), "inconclusive", "answered 40 requests"),
    (5, evidence(arm(60), arm(900), compared=10), "inconclusive", "10 mirrored"),
    (5, evidence(arm(60), arm(900), overlap=0.3), "failed", "top-k overlap"),
    (5, evidence(arm(60), arm(900), shift=2.5), "failed", "score shift"),
    (5, evidence(arm(60, errors=3), arm(900, errors=1)), "failed", "error rate"),
    (5, evidence(arm(60, empty=6), arm(900)), "failed", "empty results"),
    (5, evidence(arm(60, empty=1, users_per_request=4), arm(900)), "passed", None),  # 1 of 240 users
    (5, evidence(arm(60, errors=60), arm(900)), "failed", "error rate"),  # no user answered at all
    (5, evidence(arm(60, p99=0.5), arm(900, p99=0.1)), "failed", "p99 latency"),
    (5, evidence(arm(60, p99=0.03), arm(900, p99=0.01)), "passed", None),  # 3x, but 20 ms: noise
    (5, evidence(arm(60), arm(900), failed=5), "failed", "mirrored requests failed"),
    (100, evidence(arm(60), arm(0), compared=0, overlap=None, shift=None), "passed", None),
])
def test_a_step_is_judged_on_every_figure(weight, ev, verdict, reason):
    got, reasons = judge(POLICY, weight, ev, ev["stable"] if ev["stable"]["requests"] else arm(900))
    assert got == verdict, reasons
    assert (reason is None and not reasons) or any(reason in r for r in reasons), reasons


def test_the_walk_is_drawn(tmp_path):
    steps = [{"step": i + 1, "weight": w, "verdict": v, **evidence(arm(60), arm(900), overlap=o)}
             for i, (w, v, o) in enumerate([(5, "passed", 0.95), (25, "failed", 0.3)])]
    report = {"model": "m", "version": "3", "champion": "2", "verdict": "failed", "steps": steps,
              "policy": {"min_topk_overlap": 0.5, "max_score_shift": 1.0}}
    path = plot_canary(report, tmp_path / "canary.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
