"""S3 and MLflow going away mid-run: bounded retries for transient errors, then a one-line cause.

Transient errors (connection refused or reset, timeouts, 5xx, throttling) are retried by the
clients themselves, with explicit budgets instead of the libraries' defaults:

- S3 (boto3): standard retry mode, 5 attempts in all, exponential back-off with jitter (at most
  20 s between attempts), 5 s to connect, 60 s per read;
- MLflow (REST): 4 retries on connection errors and 429/5xx, back-off 1, 2, 4, 8 s (+ up to 1 s
  jitter), 120 s per request (a proxied artifact upload answers only once it is in S3).

A dead server therefore fails a call within about 20-30 s. What is left after the retries ends
the step with one line naming the service and its address (`outage_message`); permanent errors
(a missing object, an unknown version, a refused request) are not retried. The environment can
override the MLflow budget (MLFLOW_HTTP_REQUEST_*), as MLflow documents.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from onerec.settings import Settings

S3_RETRIES = {"mode": "standard", "total_max_attempts": 5}
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 60
MLFLOW_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
}


def s3_client_config():
    from botocore.config import Config  # heavy: boto3

    return Config(retries=dict(S3_RETRIES), connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S)


def configure_mlflow_http() -> None:
    """MLflow's retry budget for this process (MLflow reads these variables on every request)."""
    for name, value in MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(name, value)


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unreachable(text: str) -> bool:
    markers = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
               "Read timed out", "Connection aborted", "RemoteDisconnected", "ConnectionResetError",
               "Connection broken", "IncompleteRead",  # the server died while it answered
               "too many 500 error responses", "too many 503 error responses")
    return any(m in text for m in markers)


def _answers(url: str) -> bool:
    """Whether anything answers HTTP at `url` right now (2 s): tells which server is the one down."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def outage_message(exc: BaseException, settings: Settings | None) -> str | None:
    """One line for an S3 or MLflow failure that outlived the retries; None for anything else.

    `settings`: the configuration the failed step ran with (its S3 endpoint and tracking URI are
    named and probed; None: a configuration that did not load, nothing is probed).
    MLflow proxies artifacts into S3, so a failed artifact request may mean that S3 is down
    behind a healthy MLflow: both are probed to name the one that is not answering.
    """
    import requests  # heavy: requests
    from botocore.exceptions import BotoCoreError, ClientError  # heavy: boto3

    s3 = (settings.s3_endpoint_url if settings else None) or ""
    tracking = (settings.tracking_uri() if settings else None) or ""
    if isinstance(exc, BotoCoreError | ClientError):
        return f"S3 ({s3 or 'AWS'}): {_first_line(exc)}"
    tracking = tracking or "the tracking server"
    if isinstance(exc, requests.exceptions.RequestException):
        text = f"{type(exc).__name__}: {exc}"
    else:
        try:
            from mlflow.exceptions import MlflowException  # heavy: MLflow
        except ImportError:
            return None
        if not isinstance(exc, MlflowException):
            return None
        text = str(exc)
        if not _unreachable(text):
            return f"MLflow ({tracking}): {_first_line(text)}"
    if s3 and not _answers(s3):
        return f"S3 unreachable at {s3} after retries (MLflow could not store or read artifacts)"
    if not tracking.startswith("http") or not _answers(tracking.rstrip("/") + "/health"):
        return f"MLflow unreachable at {tracking} after retries"
    return f"MLflow ({tracking}) failed after retries: {_first_line(text, 200)}"
