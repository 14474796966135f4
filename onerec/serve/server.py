"""`onerec-fp8 serve`: the inference server for one model version (onerec.serve.app under uvicorn).

    onerec-fp8 serve --model-uri models:/onerec-v2-fp8/4 --model-digest SHA256 --port 8080
    onerec-fp8 serve --model-uri path/to/quantized-or-checkpoint-folder --port 8080

Shutdown (SIGTERM or SIGINT): readiness flips to 503 at once, the server keeps answering for
--drain-seconds (so a load balancer or the local proxy stops sending it traffic), then stops
accepting connections and gives in-flight requests up to --graceful-timeout seconds to finish.
A second signal exits at once. If the model fails to load or warm up the server stops and the
command fails with the reason (exit 1). Logs (uvicorn's included) go to stderr; the one JSON
line on stdout, printed at exit, summarises the run.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import threading

from onerec.errors import UserError
from onerec.serve.config import ServerConfig, default
from onerec.settings import Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-uri", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local quantized or bf16 folder")
    parser.add_argument("--model-digest", default=os.environ.get("ONEREC_MODEL_DIGEST") or None,
                        help="for a models:/ URI (required): the version digest the pipeline signed; other bytes "
                             "are never loaded (default: $ONEREC_MODEL_DIGEST, e.g. in a container)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 inside a container)")
    parser.add_argument("--model-name", default=None, help="name in responses and /v2/models/{name}")
    parser.add_argument("--model-version", default=None, help="version label (default: from the registry or the manifest)")
    parser.add_argument("--device", default=default("device"), help="auto (CUDA when present), cpu, or cuda[:N]")
    parser.add_argument("--cache-dir", default=None, help="where registry versions are downloaded")
    parser.add_argument("--max-batch-size", type=int, default=default("max_batch_size"), help="users per beam search (dynamic batching)")
    parser.add_argument("--max-wait-ms", type=float, default=default("max_wait_ms"),
                        help="with the GPU idle, how long a request waits for batch-mates (while a batch runs, "
                             "the next one fills anyway)")
    parser.add_argument("--max-users", type=int, default=default("max_users"), help="users per request")
    parser.add_argument("--max-beam", type=int, default=default("max_beam"))
    parser.add_argument("--default-k", type=int, default=default("default_k"))
    parser.add_argument("--default-beam", type=int, default=default("default_beam"))
    parser.add_argument("--beam-widths", default=None,
                        help="comma-separated beam widths searched (a request's beam is rounded up to the next; "
                             "wider is a 422); default: --default-beam and --max-beam on a GPU, any on CPU")
    parser.add_argument("--history-buckets", default=None,
                        help="comma-separated history lengths a batch is padded up to on a GPU (one CUDA graph each "
                             "per width and batch bucket); default: 64, 128, ... doubling, then the model's context")
    parser.add_argument("--max-body-bytes", type=int, default=default("max_body_bytes"))
    parser.add_argument("--threads", type=int, default=default("threads"),
                        help="torch CPU threads (0: torch's default); 1 avoids oversubscription on a busy small host")
    parser.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds for in-flight requests at shutdown")
    parser.add_argument("--drain-seconds", type=float, default=0.0, help="keep serving this long after readiness flips")
    parser.add_argument("--access-log", action="store_true", help="log every request (stderr)")
    limits = parser.add_argument_group("limits (docs/serving.md)")
    limits.add_argument("--max-in-flight", type=int, default=default("max_in_flight"),
                        help="requests being answered; beyond: 503 + Retry-After (health and metrics exempt)")
    limits.add_argument("--max-connections", type=int, default=default("max_connections"),
                        help="open connections; beyond: 503 + Retry-After and closed")
    limits.add_argument("--header-timeout", type=float, default=default("header_timeout_s"), help="seconds for a request's headers")
    limits.add_argument("--body-timeout", type=float, default=default("body_timeout_s"), help="seconds for a request's body, after its headers")
    limits.add_argument("--keep-alive-timeout", type=float, default=default("keep_alive_s"),
                        help="idle seconds between requests (above clients' pool expiry)")


def int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    """'128,512' -> (128, 512); None stays None; anything else is a one-line error naming the flag."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    return values


def _log_config() -> dict:
    """uvicorn's logging with every handler on stderr (stdout carries only the result JSON)."""
    from uvicorn.config import LOGGING_CONFIG  # heavy: uvicorn

    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    return config


def uvicorn_config(app, host: str, port: int, **kwargs):
    """The uvicorn.Config for an app of onerec.serve.app.create_app, with its connection limits."""
    from onerec.serve.guard import guarded_config  # heavy: Starlette

    config = app.state.config
    return guarded_config(app, host, port, header_timeout_s=config.header_timeout_s,
                          max_header_bytes=config.max_header_bytes, max_connections=config.max_connections,
                          keep_alive_s=config.keep_alive_s, metrics=app.state.metrics, **kwargs)


def _draining_server_class():
    import uvicorn  # heavy: uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose first exit signal flips readiness and waits `drain_seconds` before stopping."""

        def __init__(self, config, state, drain_seconds: float):
            super().__init__(config)
            self.state = state
            self.drain_seconds = drain_seconds
            self._drain_timer: threading.Timer | None = None

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit or self._drain_timer is not None:  # a second signal: stop now
                self.should_exit = True
                self.force_exit = True
                return
            self.state.draining = True
            log.info("signal %s: not ready any more; draining for %.1f s", sig, self.drain_seconds)
            if self.drain_seconds <= 0:
                self.should_exit = True
                return
            self._drain_timer = threading.Timer(self.drain_seconds, lambda: setattr(self, "should_exit", True))
            self._drain_timer.daemon = True
            self._drain_timer.start()

    return DrainingServer


def main(args: argparse.Namespace) -> dict:
    """The server's entry point: its Settings (environment + the local stack's) are built here, once."""
    from onerec.serve.app import create_app  # heavy: fastapi, torch

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, not {args.port}")
    if args.graceful_timeout < 0 or args.drain_seconds < 0:
        raise UserError("--graceful-timeout and --drain-seconds must be >= 0")
    config = ServerConfig(
        model_uri=args.model_uri, model_name=args.model_name, model_version=args.model_version,
        model_digest=args.model_digest,
        device=args.device, cache_dir=args.cache_dir, max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms, max_users=args.max_users, max_beam=args.max_beam,
        default_k=args.default_k, default_beam=args.default_beam, max_body_bytes=args.max_body_bytes,
        threads=args.threads, max_in_flight=args.max_in_flight, max_connections=args.max_connections,
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive_timeout,
        beam_widths=int_list(args.beam_widths, "--beam-widths"),
        history_buckets=int_list(args.history_buckets, "--history-buckets"),
        settings=Settings.load(),
    )
    holder: dict = {}

    def on_fatal(exc: BaseException) -> None:
        holder["error"] = exc
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_fatal=on_fatal)  # checks the config and the URI's form before binding
    uv_config = uvicorn_config(
        app, args.host, args.port, log_config=_log_config(), access_log=args.access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    server = _draining_server_class()(uv_config, app.state.server, args.drain_seconds)
    holder["server"] = server
    server.run()
    error = holder.get("error")
    if error is not None:
        raise UserError(f"model {args.model_uri} was not served: {error}")
    if not server.started:
        raise UserError(f"the server did not start on {args.host}:{args.port} (see the log above)")
    state = app.state.server
    served = state.served
    return {
        "stopped": True, "model": state.name, "version": served.version if served else None,
        "url": f"http://{args.host}:{args.port}",
    }
