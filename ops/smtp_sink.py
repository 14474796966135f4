"""The local stack's mail sink: an SMTP server on loopback that keeps every message as a file.

    python -m ops.smtp_sink --port 8025 --maildir .onerec/mail

Stands in for the on-call mail relay of production, so the failure notifications of the DAGs
can be read locally (and by tests): one `<time>-<n>.eml` file per message, written atomically.
Loopback only, messages capped at 1 MiB, nothing is ever relayed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import sys
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path

log = logging.getLogger("ops.smtp_sink")
MAX_MESSAGE = 1 << 20


class MaildirHandler:
    def __init__(self, maildir: Path):
        self.maildir = maildir
        self.counter = itertools.count()

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's handler hook
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{next(self.counter):05d}.eml"
        tmp = self.maildir / f".{name}.tmp"
        tmp.write_bytes(envelope.original_content or envelope.content)
        os.replace(tmp, self.maildir / name)
        log.info("mail from %s to %s kept as %s", envelope.mail_from, envelope.rcpt_tos, name)
        return "250 Message accepted for delivery"


def read_mail(maildir: str | Path) -> list:
    """Every message in the sink, oldest first, as email.message.EmailMessage."""
    return [BytesParser(policy=policy.default).parsebytes(p.read_bytes())
            for p in sorted(Path(maildir).glob("*.eml"))]


def main(argv: list[str] | None = None) -> int:
    from aiosmtpd.smtp import SMTP

    parser = argparse.ArgumentParser(prog="python -m ops.smtp_sink", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.maildir.mkdir(parents=True, exist_ok=True)
    os.chmod(args.maildir, 0o700)
    handler = MaildirHandler(args.maildir)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, data_size_limit=MAX_MESSAGE, hostname="localhost", timeout=30),
            host="127.0.0.1", port=args.port)
        log.info("SMTP sink on 127.0.0.1:%d, messages in %s", args.port, args.maildir)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
