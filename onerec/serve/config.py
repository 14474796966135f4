"""The server's configuration: one dataclass, the one source of its defaults (`onerec-fp8 serve`'s
flags take theirs from it). Stdlib only, so building the CLI's parser stays light."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from onerec.errors import UserError
from onerec.settings import Settings

HARD_MAX_USERS = 4096  # the request schema's bounds (onerec.serve.schemas), whatever the config says
HARD_MAX_BEAM = 4096


@dataclass
class ServerConfig:
    model_uri: str
    model_name: str | None = None  # default: the registry name, else settings.model_name
    model_version: str | None = None  # default: the registry version, else local-<manifest digest>
    model_digest: str | None = None  # the signed version digest a registry version must hash to
    device: str = "auto"
    cache_dir: str | None = None
    max_batch_size: int = 64  # users per beam search
    # with the GPU idle, wait this long for batch-mates (0: start at once; while a batch runs the
    # next one fills anyway, onerec/serve/batcher.py)
    max_wait_ms: float = 0.0
    max_users: int = 64  # users per request
    max_beam: int = 512
    default_k: int = 10
    default_beam: int = 128
    # widths searched; a request's beam is rounded up to the next one, beyond the largest it is a
    # 422. None: (default_beam, max_beam) on the engine (GPU), any width on the reference search
    beam_widths: tuple[int, ...] | None = None
    history_buckets: tuple[int, ...] | None = None  # engine: None = length_buckets(context_len)
    max_body_bytes: int = 1 << 20
    threads: int = 0  # torch CPU threads for the beam search (0: torch's default)
    # protections (onerec.serve.guard); the connection-level ones apply under uvicorn_config()
    max_in_flight: int = 256  # requests being answered; beyond: 503 + Retry-After (health exempt)
    max_connections: int = 1024  # open connections; beyond: 503 + Retry-After, closed
    header_timeout_s: float = 5.0  # from a request's first byte (or the connection) to its last header
    body_timeout_s: float = 10.0  # from the last header to the last body byte
    # idle time between requests on one connection: longer than clients' pool expiry (httpx: 5 s),
    # else a request sent just as the server closes the idle connection is reset (seen at 5 s)
    keep_alive_s: float = 75.0
    max_header_bytes: int = 64 * 1024
    # the server's Settings, built once by its entry point (`onerec-fp8 serve`): the tracking server
    # and serving account of a models:/ URI, the default cache folder and model name
    settings: Settings = field(default_factory=Settings)

    def validate(self) -> None:
        checks = [
            (1 <= self.max_batch_size <= 65536, "max_batch_size must be in 1..65536"),
            (0 <= self.max_wait_ms <= 10_000, "max_wait_ms must be in 0..10000"),
            (1 <= self.max_users <= HARD_MAX_USERS, f"max_users must be in 1..{HARD_MAX_USERS}"),
            (1 <= self.max_beam <= HARD_MAX_BEAM, f"max_beam must be in 1..{HARD_MAX_BEAM}"),
            (1 <= self.default_k <= self.default_beam <= self.max_beam, "need 1 <= default_k <= default_beam <= max_beam"),
            (self.beam_widths is None or (0 < len(self.beam_widths) <= 16 and all(
                isinstance(w, int) and 1 <= w <= self.max_beam for w in self.beam_widths)),
             f"beam_widths: 1 to 16 widths, each in 1..max_beam={self.max_beam}"),
            (self.beam_widths is None or self.default_beam <= max(self.beam_widths),
             "default_beam must not exceed the largest of beam_widths"),
            (self.history_buckets is None or (0 < len(self.history_buckets) <= 64 and all(
                isinstance(b, int) and 1 <= b <= 1 << 20 for b in self.history_buckets)),
             "history_buckets: 1 to 64 lengths, each in 1..1048576"),
            (1024 <= self.max_body_bytes <= 1 << 30, "max_body_bytes must be in 1 KiB..1 GiB"),
            (0 <= self.threads <= 1024, "threads must be in 0..1024"),
            (1 <= self.max_in_flight <= 65536, "max_in_flight must be in 1..65536"),
            (1 <= self.max_connections <= 65536, "max_connections must be in 1..65536"),
            (all(0 < t <= 3600 for t in (self.header_timeout_s, self.body_timeout_s, self.keep_alive_s)),
             "header, body and keep-alive timeouts must be in (0, 3600] seconds"),
            (1024 <= self.max_header_bytes <= 1 << 20, "max_header_bytes must be in 1 KiB..1 MiB"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def shapes(self):
        from onerec.serve.model_store import (
            ServingShapes,  # heavy: numpy; `onerec-fp8 --help` reads the defaults here
        )

        return ServingShapes(
            beam_widths=tuple(sorted(set(self.beam_widths))) if self.beam_widths else None,
            engine_widths=tuple(sorted({self.default_beam, self.max_beam})),
            max_batch_users=self.max_batch_size, history_buckets=self.history_buckets,
        )


def default(name: str):
    """ServerConfig's default of field `name` (what a flag left out means)."""
    return {f.name: f.default for f in dataclasses.fields(ServerConfig)}[name]
