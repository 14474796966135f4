"""On-call notifications: a failed DAG run becomes a mail (SMTP) and, optionally, a webhook post.

    alert_smtp         host:port of the mail relay (the local stack: its mail sink); empty: no mail
    alert_smtp_starttls, alert_smtp_ca_file
                       STARTTLS with the relay's certificate verified (against the system's CAs or
                       this bundle) before anything is sent; a relay that cannot is not mailed
    alert_smtp_user, alert_smtp_password_file
                       log in after STARTTLS (the config refuses a login without it); the password
                       is read from a 0600 file when mailing, never logged
    alert_email        who gets it
    alert_webhook_url  a chat/incident webhook that accepts a JSON {"text": ...} POST; empty: none

The DAGs call `send_failure` with `failure_message` from their failure callbacks
(dags/onerec_fp8_common.py): one message per failed task (after its retries) naming the DAG, the
task, the run, the one-line error and a link to the task's log; a run that fails without a failed
task (its dagrun_timeout) gets one naming the run. A failure to notify is logged and never hides
the failure itself.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path

from ops.mlflow_auth import read_private
from tasks.config import PipelineConfig

log = logging.getLogger(__name__)


MAX_ERROR_CHARS = 500


def one_line(error: object) -> str:
    """An exception or message as one line: its first line, at most MAX_ERROR_CHARS characters."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    line = lines[0].strip() or type(error).__name__
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 3] + "..."


def failure_message(dag_id: str, run_id: str, error: object, link: str, task_id: str | None = None) -> tuple[str, str]:
    """(subject, body) of an on-call notification: what failed, where, why in one line, and where to look."""
    what = f"{dag_id}.{task_id}" if task_id else dag_id
    error = one_line(error)
    subject = f"[onerec-fp8] {what} failed: {error}"[:200]
    body = "\n".join([
        f"DAG:   {dag_id}",
        *([f"Task:  {task_id}"] if task_id else []),
        f"Run:   {run_id}",
        f"Error: {error}",
        f"Log:   {link}",
        "",
        "Runbook: docs/runbook.md (When the requantize DAG fails; Refused versions; Roll back).",
    ])
    return subject, body


def send_failure(subject: str, body: str, cfg: PipelineConfig) -> dict:
    """Send the notification on every channel `cfg` (the caller's configuration) names; returns
    {channel: "sent" | error text}."""
    sent: dict[str, str] = {}
    if cfg.alert_smtp:
        message = EmailMessage()
        message["Subject"], message["From"], message["To"] = subject, cfg.alert_from, cfg.alert_email
        message.set_content(body)
        try:
            send_mail(cfg, message)
            sent["smtp"] = "sent"
        except (OSError, smtplib.SMTPException, ValueError) as exc:  # ssl.SSLError is an OSError
            sent["smtp"] = f"failed: {exc}"
    if cfg.alert_webhook_url:
        import httpx  # heavy: httpx, only where HTTP is spoken

        try:
            httpx.post(cfg.alert_webhook_url, json={"text": f"{subject}\n{body}"}, timeout=15).raise_for_status()
            sent["webhook"] = "sent"
        except httpx.HTTPError as exc:
            sent["webhook"] = f"failed: {exc}"
    for channel, outcome in sent.items():
        (log.info if outcome == "sent" else log.error)("failure notification via %s: %s", channel, outcome)
    if not sent:
        log.warning("no notification channel configured (alert_smtp, alert_webhook_url): %s", subject)
    return sent


def send_mail(cfg, message) -> None:
    """`message` through the configured relay: STARTTLS and login when configured (module doc)."""
    host, _, port = cfg.alert_smtp.rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=15) as smtp:
        if cfg.alert_smtp_starttls:
            smtp.starttls(context=ssl.create_default_context(cafile=cfg.alert_smtp_ca_file or None))
        if cfg.alert_smtp_user:
            smtp.login(cfg.alert_smtp_user, read_private(Path(cfg.alert_smtp_password_file), "SMTP password", 1))
        smtp.send_message(message)
