"""The inference server as a FastAPI app: recommend, KServe v2 health and metadata, Prometheus metrics.

Life of a server: the app starts live (/v2/health/live answers at once), loads and verifies the
model in a thread, then sends one warm-up request through the same batcher real traffic uses;
only when that succeeded does /v2/health/ready answer 200. On shutdown readiness flips to 503
first (the server module delays the exit by --drain-seconds so load balancers notice), in-flight
requests are answered, then the batcher stops.

POST /v1/recommend body: {"users": [{"history": [ids, newest last], "profile": {name: value}}],
"k": 10, "beam": 128}. Per user the answer has the items (best first) with their scores (summed
log-probabilities of the code triples) and what was done to the input:
- unknown_items: history ids the model does not know (new items), dropped;
- truncated_items: known items beyond the model's context, the oldest ones, dropped;
- filled_profile_features: profile features the model uses but the user lacked: they take the
  model's stored training mean, i.e. a neutral value (z-score 0 after the model's normalisation);
- ignored_profile_features: features the model does not use (e.g. after a model change), ignored;
- unseen_profile_values: categorical values the model's vocabulary lacks: they take the unknown
  bucket (onerec/features.py), and count in the onerec_unseen_profile_values metric per feature.
None of these is an error: production traffic always carries them. Malformed bodies are (4xx), and
so is a profile value of the wrong type (a string for a numeric feature or a number for a
categorical one). Timeouts, connection and in-flight caps and the accounting of every response:
onerec.serve.guard.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from onerec import __version__
from onerec.errors import UserError
from onerec.serve import open_inference as oip
from onerec.serve.batcher import BatcherStopped, DynamicBatcher
from onerec.serve.config import ServerConfig
from onerec.serve.guard import RequestGuard, read_body
from onerec.serve.model_store import ServedModel, load_served_model, parse_model_uri, require_digest
from onerec.serve.schemas import RecommendRequest

log = logging.getLogger(__name__)

JSON_TYPES = ("application/json",)
MAX_ERRORS_SHOWN = 10


@dataclass
class PreparedUser:
    history: list[int]
    profile: np.ndarray | None  # [P] float32, complete (missing features filled)
    filled: int
    ignored: int
    unseen: list[str] = field(default_factory=list)  # categorical features whose value is unseen
    codes: np.ndarray | None = None  # the kept history's semantic ids [n, levels] (encode_history)
    unknown: int = 0  # history ids unknown to the model, dropped


def encode_user(served: ServedModel, user: PreparedUser) -> PreparedUser:
    """The user's history as the model's codes, done when the request arrives (host work that
    overlaps the batch on the GPU), not when its batch runs."""
    from onerec.semantic_ids import encode_history  # heavy: torch

    user.codes, user.unknown = encode_history(user.history, served.table, served.context_len)
    return user


@dataclass
class UserResult:
    items: list[int]
    scores: list[float]
    unknown_items: int
    truncated_items: int
    filled_profile_features: int = 0
    ignored_profile_features: int = 0
    unseen_profile_values: int = 0

    def top(self, k: int) -> UserResult:
        return UserResult(self.items[:k], self.scores[:k], self.unknown_items, self.truncated_items,
                          self.filled_profile_features, self.ignored_profile_features, self.unseen_profile_values)


class ProfileError(ValueError):
    """A profile value of the wrong type for its feature (answered 422)."""


def prepare_user(served: ServedModel, history: list[int], profile: dict[str, float | str] | None) -> PreparedUser:
    from onerec.features import encode_categorical  # heavy: pandas

    names = served.profile_features
    categorical = served.model.cfg.categorical_features
    if not names and not categorical:
        return PreparedUser(history, None, 0, len(profile or {}))
    given = profile or {}
    known = set(names) | set(categorical)
    values = np.concatenate([served.profile_fill, np.zeros(len(categorical), np.float32)])
    filled, unseen = 0, []
    for i, name in enumerate(names):
        if name not in given:
            filled += 1
        elif isinstance(given[name], str):
            raise ProfileError(f"profile feature {name!r} is numeric, got a string")
        else:
            values[i] = given[name]
    for i, (name, vocabulary) in enumerate(categorical.items()):
        if name not in given:
            filled += 1  # the unknown bucket, which also learnt missing values at training
        elif not isinstance(given[name], str):
            raise ProfileError(f"profile feature {name!r} is categorical: send a string, not {given[name]!r}")
        else:
            codes, n_unseen = encode_categorical([given[name]], vocabulary)
            values[len(names) + i] = codes[0]
            if n_unseen:
                unseen.append(name)
    return PreparedUser(history, values, filled, sum(1 for n in given if n not in known), unseen)


def run_users(served: ServedModel, users: list[PreparedUser], k: int, beam: int) -> list[UserResult]:
    """One beam search for `users` (any number): the work of one batch."""
    import torch  # heavy: torch

    from onerec.semantic_ids import pad_histories  # heavy: torch

    users = [u if u.codes is not None else encode_user(served, u) for u in users]
    sids, mask = pad_histories([u.codes for u in users], served.table.shape[1])
    unknown = [u.unknown for u in users]
    profile = None
    if users[0].profile is not None:
        profile = torch.from_numpy(np.stack([u.profile for u in users]))
    with torch.inference_mode():
        recs = served.search(sids, mask, profile, beam, k)  # host tensors: the search moves them
    items = recs.items.cpu().numpy()
    scores = recs.scores.float().cpu().numpy()
    results = []
    for i, user in enumerate(users):
        valid = items[i] >= 0  # fewer valid items than k: padding
        known = len(user.history) - unknown[i]
        results.append(UserResult(
            items[i][valid].tolist(), [float(s) for s in scores[i][valid]], unknown[i],
            max(0, known - served.context_len), user.filled, user.ignored, len(user.unseen),
        ))
    return results


class EngineCollector:
    """The engine's own counters, read when /metrics is scraped: eager fallbacks (shapes outside
    the captured set), graph captures after ready (0 by design) and history positions served vs
    padded by the buckets."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily  # heavy: prometheus_client

        engine = getattr(self.metrics.served, "engine", None)
        eager = CounterMetricFamily("onerec_eager_fallbacks", "batches run eagerly: their shape had no CUDA graph")
        captures = CounterMetricFamily("onerec_graph_captures_after_ready", "CUDA graphs captured after ready")
        positions = CounterMetricFamily("onerec_history_positions", "history positions searched, real or bucket padding",
                                        labels=["kind"])
        if engine is not None:
            eager.add_metric([], engine.eager_fallbacks)
            captures.add_metric([], engine.captures_after_ready)
            for kind, n in engine.positions.items():
                positions.add_metric([kind], n)
        yield from (eager, captures, positions)


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one test process)."""

    def __init__(self):
        from prometheus_client import (  # heavy: prometheus_client
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            Info,
        )

        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "onerec_request_duration_seconds", "HTTP request latency by route", ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_users = Histogram(
            "onerec_batch_size_users", "users per beam search (dynamic batching)", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
        )
        self.batch_seconds = Histogram(
            "onerec_batch_seconds", "one batch in the batch thread: inputs stacked, searched, answers built",
            registry=r, buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
        )
        self.gc_pause = Histogram(
            "onerec_gc_pause_seconds", "Python garbage-collector pauses (they stop every thread)", ["generation"],
            registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.responses = Counter("onerec_http_responses", "HTTP responses by route and status code", ["route", "code"], registry=r)
        self.errors = Counter("onerec_http_errors", "HTTP responses with status >= 400 by code", ["code"], registry=r)
        self.users = Counter("onerec_recommended_users", "users answered (/v1/recommend and /v2 infer)", registry=r)
        # the canary's empty-result share: onerec_empty_results_total / onerec_recommended_users_total
        self.empty_results = Counter("onerec_empty_results", "users answered with no item at all", registry=r)
        self.unknown_items = Counter("onerec_unknown_items", "history items dropped as unknown to the model", registry=r)
        self.truncated_items = Counter("onerec_truncated_items", "history items beyond the context, dropped", registry=r)
        self.unseen_profile_values = Counter(
            "onerec_unseen_profile_values", "categorical profile values unknown to the model (unknown bucket)",
            ["feature"], registry=r,
        )
        self.ready = Gauge("onerec_ready", "1 when /v2/health/ready answers 200", registry=r)
        self.startup_seconds = Gauge("onerec_startup_seconds", "from the app's start to ready", registry=r)
        self.graphs = Gauge("onerec_cuda_graphs", "CUDA graphs captured before ready", registry=r)
        self.graph_memory = Gauge("onerec_cuda_graph_memory_bytes", "GPU memory the captured graphs hold", registry=r)
        self.served = None  # the ServedModel, once loaded: its engine's counters are read at scrape time
        r.register(EngineCollector(self))
        self.in_flight = Gauge("onerec_in_flight_requests", "recommend requests waiting or computing", registry=r)
        self.model = Info("onerec_model", "the served model version", registry=r)


@dataclass
class ServerState:
    name: str
    served: ServedModel | None = None
    warmed: bool = False
    draining: bool = False
    failed: str | None = None
    batcher: DynamicBatcher | None = field(default=None, repr=False)
    prepared: dict = field(default_factory=dict)  # ServedModel.prepare()'s report (graphs, seconds, memory)
    startup_s: float | None = None

    @property
    def serving(self) -> bool:
        return self.served is not None and self.warmed and self.failed is None

    @property
    def ready(self) -> bool:
        return self.serving and not self.draining

    def reason(self) -> str:
        if self.failed:
            return f"failed: {self.failed}"
        if self.draining:
            return "draining"
        if self.served is None:
            return "loading model"
        return "ready" if self.warmed else "warming up"


SWITCH_INTERVAL_S = 0.0005  # Python's default is 0.005


def _route(path: str) -> str:
    if path.startswith("/v2/models/"):
        return "/v2/models/{name}/infer" if path.endswith("/infer") else "/v2/models/{name}"
    return path if path in ("/v1/recommend", "/v2/health/live", "/v2/health/ready", "/v2", "/metrics") else "other"


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _validation_error(exc: ValidationError) -> JSONResponse:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return _error(400, f"body is not valid JSON: {errors[0]['msg']}")
    shown = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in errors[:MAX_ERRORS_SHOWN]]
    first = shown[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return _error(422, f"invalid request: {where}: {first['msg']}", details=shown, n_errors=len(errors))


def create_app(
    config: ServerConfig,
    loader: Callable[[ServerConfig], ServedModel] | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app for `config`. `loader` (default: load_served_model) runs in a thread after startup;
    `on_fatal` is called when loading or warm-up fails (the CLI stops the server)."""
    config.validate()
    ref = parse_model_uri(config.model_uri, default_name=config.model_name or config.settings.model_name)
    require_digest(ref, config.model_digest)
    state = ServerState(name=config.model_name or ref.name)
    metrics = Metrics()
    loader = loader or (lambda c: load_served_model(c.model_uri, c.device, c.cache_dir, c.model_name or ref.name,
                                                    c.model_version, c.model_digest, c.shapes(), settings=c.settings))

    def run(users, k, beam):
        if config.threads:
            import torch  # heavy: torch

            if torch.get_num_threads() != config.threads:  # set in the batch thread itself
                torch.set_num_threads(config.threads)
        started = time.perf_counter()
        try:
            return run_users(state.served, users, k, beam)
        finally:
            metrics.batch_seconds.observe(time.perf_counter() - started)

    async def load_and_warm_up() -> None:
        started = asyncio.get_running_loop().time()
        try:
            served = await asyncio.to_thread(loader, config)
            state.prepared = await asyncio.to_thread(served.prepare)
            metrics.graphs.set(state.prepared["graphs"])
            metrics.graph_memory.set(state.prepared["memory_gib"] * 2**30)
            state.served = metrics.served = served
            state.name = served.name
            metrics.model.info({
                "name": served.name, "version": served.version, "kind": served.kind, "digest": served.digest,
                "backend": served.backend, "device": served.device,
            })
            log.info("loaded %s version %s (%s, %s on %s); warming up", served.name, served.version,
                     served.kind, served.backend, served.device)
            first_item = int(np.flatnonzero((served.table >= 0).all(1))[0])
            warm_user = prepare_user(served, [first_item], None)
            result = await state.batcher.submit([encode_user(served, warm_user)], 1, served.width(config.default_beam))
            if not result or not result[0].items:
                raise RuntimeError("warm-up request returned no item")
            if not all(map(math.isfinite, result[0].scores)):
                raise RuntimeError(f"warm-up scores are not finite ({result[0].scores}): NaN or Inf weights?")
            # the model, tables and warm-up garbage are permanent: a full collection no longer scans
            # them, so collector pauses stay short while requests wait
            gc.collect()
            gc.freeze()
            state.warmed = True
            state.startup_s = asyncio.get_running_loop().time() - started
            metrics.startup_seconds.set(state.startup_s)
            metrics.ready.set(1)
            log.info("ready: %s version %s in %.1f s (%d CUDA graphs holding %.2f GiB; beam widths %s)",
                     served.name, served.version, state.startup_s, state.prepared["graphs"],
                     state.prepared["memory_gib"], "any" if served.beam_widths is None else list(served.beam_widths))
        except Exception as exc:
            state.failed = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UserError) else str(exc)
            log.error("model %s failed to load or warm up: %s", config.model_uri, state.failed)
            if on_fatal is not None:
                on_fatal(exc)

    gc_started: dict[int, float] = {}

    def time_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[info["generation"]] = time.perf_counter()
        elif (t0 := gc_started.pop(info["generation"], None)) is not None:
            metrics.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - t0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # each torch call in the batch thread gives up the GIL and takes it back; while the event
        # loop runs Python that wait lasts up to the switch interval (docs/serving.md: an H200 A/B)
        previous_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        gc.callbacks.append(time_gc)
        state.batcher = DynamicBatcher(run, config.max_batch_size, config.max_wait_ms / 1000, metrics.batch_users.observe)
        state.batcher.start()
        loading = asyncio.create_task(load_and_warm_up(), name="onerec-load")
        try:
            yield
        finally:
            state.draining = True
            metrics.ready.set(0)
            if not loading.done():
                loading.cancel()
            await state.batcher.stop()
            gc.callbacks.remove(time_gc)
            sys.setswitchinterval(previous_switch_interval)

    app = FastAPI(title="onerec-fp8 serving", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.state.metrics = metrics
    app.state.config = config

    app.add_middleware(RequestGuard, metrics=metrics, route_of=_route, body_timeout_s=config.body_timeout_s,
                       max_in_flight=config.max_in_flight)

    async def json_body(request: Request, type_optional: bool = False) -> bytes | JSONResponse:
        """The body of a JSON POST, or the 400/413/415 answer. `type_optional`: a request without a
        Content-Type is read as JSON (the Open Inference Protocol names none; its clients send none)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in JSON_TYPES and not (type_optional and not content_type):
            return _error(415, f"Content-Type must be application/json, not {content_type or 'missing'!r}")
        if "inference-header-content-length" in request.headers:
            return _error(400, "binary tensor data is not supported; send the tensors as JSON")
        body = await read_body(request, config.max_body_bytes)
        if body is None:
            return _error(413, f"body larger than {config.max_body_bytes} bytes")
        return body

    async def answer(users: list[tuple[list[int], dict | None]], k: int | None, beam: int | None):
        """(served, k, width, results) for the users, or the error answer; one path for /v1 and /v2."""
        if len(users) > config.max_users:
            return _error(422, f"too many users: {len(users)} > {config.max_users} per request")
        beam = beam if beam is not None else max(config.default_beam, k or 0)
        k = k if k is not None else min(config.default_k, beam)
        if k > beam:
            return _error(422, f"k ({k}) must not exceed beam ({beam})")
        if beam > config.max_beam:
            return _error(422, f"beam {beam} exceeds this server's maximum {config.max_beam}")
        if not state.serving:
            return _error(503, f"model not ready ({state.reason()})")
        served = state.served
        width = served.width(beam)
        if width is None:
            return _error(422, f"beam {beam}: this server searches with beam widths {list(served.beam_widths)}; "
                               f"ask for at most {max(served.beam_widths)}")
        try:
            prepared = [encode_user(served, prepare_user(served, history, profile)) for history, profile in users]
        except ProfileError as exc:
            return _error(422, str(exc))
        for user in prepared:
            for feature in user.unseen:
                metrics.unseen_profile_values.labels(feature).inc()
        metrics.in_flight.inc()
        try:
            results = await state.batcher.submit(prepared, k, width)
        except BatcherStopped as exc:
            return _error(503, f"not accepting requests: {exc}")
        finally:
            metrics.in_flight.dec()
        # a ready model gives finite scores (warm-up checks it): non-finite ones come from this input
        for i, r in enumerate(results):
            if not all(map(math.isfinite, r.scores)):
                return _error(422, f"users.{i}: the model's scores are not finite for this input "
                                   "(profile values far outside the training range?)")
        metrics.users.inc(len(results))
        metrics.empty_results.inc(sum(1 for r in results if not r.items))
        metrics.unknown_items.inc(sum(r.unknown_items for r in results))
        metrics.truncated_items.inc(sum(r.truncated_items for r in results))
        return served, k, width, results

    @app.post("/v1/recommend")
    async def recommend(request: Request):
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            req = RecommendRequest.model_validate_json(body)
        except ValidationError as exc:
            return _validation_error(exc)
        answered = await answer([(u.history, u.profile) for u in req.users], req.k, req.beam)
        if isinstance(answered, JSONResponse):
            return answered
        served, k, width, results = answered
        return {
            "model": {"name": served.name, "version": served.version, "kind": served.kind},
            "k": k, "beam": width,
            "users": [r.__dict__ for r in results],
        }

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        """Open Inference Protocol: the recommend call as tensors (onerec.serve.open_inference)."""
        if name != state.name:
            return _error(404, f"unknown model {name!r}; this server serves {state.name!r}")
        body = await json_body(request, type_optional=True)
        if isinstance(body, JSONResponse):
            return body
        try:
            req = oip.InferRequest.model_validate_json(body)
        except ValidationError as exc:
            return _validation_error(exc)
        if state.served is None:
            return _error(503, f"model not ready ({state.reason()})")
        served = state.served
        try:
            outputs = oip.check_outputs(req)
            users = oip.parse_users(req, served.profile_features, list(served.model.cfg.categorical_features),
                                    config.max_users)
        except oip.TensorError as exc:
            return _error(exc.status, str(exc))
        params = req.parameters or oip.InferParameters()
        answered = await answer(users, params.k, params.beam)
        if isinstance(answered, JSONResponse):
            return answered
        served, k, width, results = answered
        return {
            "model_name": served.name, "model_version": served.version,
            **({"id": req.id} if req.id is not None else {}),
            "parameters": {"k": k, "beam": width, "kind": served.kind},
            "outputs": oip.response_tensors(results, k, outputs),
        }

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        if state.ready:
            return {"ready": True}
        return JSONResponse({"ready": False, "reason": state.reason()}, status_code=503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "onerec-fp8", "version": __version__, "extensions": []}

    def model_metadata(served: ServedModel) -> dict:
        inputs, outputs = oip.model_tensors(served.profile_features, list(served.model.cfg.categorical_features))
        return {
            "name": served.name, "versions": [served.version], "platform": "pytorch",
            "inputs": inputs, "outputs": outputs,
            "parameters": {
                "kind": served.kind, "digest": served.digest, "backend": served.backend, "device": served.device,
                "recipe": ((served.recipe or {}).get("recipe") or {}).get("name"),
                "context_len": served.context_len, "profile_features": served.profile_features,
                "categorical_profile_features": list(served.model.cfg.categorical_features),
                "default_k": config.default_k, "default_beam": config.default_beam, "max_beam": config.max_beam,
                "beam_widths": None if served.beam_widths is None else list(served.beam_widths),
                "max_users": config.max_users, "ready": state.ready, "history_padding": oip.PADDING_ITEM,
                "startup_seconds": None if state.startup_s is None else round(state.startup_s, 2),
                "cuda_graphs": state.prepared, **served_shapes(served),
            },
        }

    def served_shapes(served: ServedModel) -> dict:
        engine = served.engine
        if engine is None:
            return {}
        return {"batch_buckets": list(engine.config.batch_buckets), "history_buckets": list(engine.history_buckets),
                "eager_fallbacks": engine.eager_fallbacks, "padding": dict(engine.positions)}

    @app.get("/v2/models/{name}")
    async def metadata(name: str):
        if name != state.name:
            return _error(404, f"unknown model {name!r}; this server serves {state.name!r}")
        if state.served is None:
            return _error(503, f"model {name!r} is not loaded yet ({state.reason()})")
        return model_metadata(state.served)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        if name != state.name:
            return _error(404, f"unknown model {name!r}; this server serves {state.name!r}")
        if state.ready:
            return {"name": name, "ready": True}
        return JSONResponse({"name": name, "ready": False, "reason": state.reason()}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # heavy: prometheus_client

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
