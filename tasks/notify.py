"""On-call notifications: a failed DAG run becomes a mail (SMTP) and, optionally, a webhook post.

    alert_smtp         host:port of the mail relay (the local stack: its mail sink); empty: no mail
    alert_email        who gets it
    alert_webhook_url  a chat/incident webhook that accepts a JSON {"text": ...} POST; empty: none

The DAGs call `send_failure` from their failure callback (dags/onerec_fp8_common.py); a failure to
notify is logged and never hides the failure itself.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def send_failure(subject: str, body: str, cfg=None) -> dict:
    """Send the notification on every configured channel; returns {channel: "sent" | error text}."""
    from tasks.config import load_config

    cfg = cfg or load_config()
    sent: dict[str, str] = {}
    if cfg.alert_smtp:
        import smtplib
        from email.message import EmailMessage

        host, _, port = cfg.alert_smtp.rpartition(":")
        message = EmailMessage()
        message["Subject"], message["From"], message["To"] = subject, cfg.alert_from, cfg.alert_email
        message.set_content(body)
        try:
            with smtplib.SMTP(host, int(port), timeout=15) as smtp:
                smtp.send_message(message)
            sent["smtp"] = "sent"
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            sent["smtp"] = f"failed: {exc}"
    if cfg.alert_webhook_url:
        import httpx

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
