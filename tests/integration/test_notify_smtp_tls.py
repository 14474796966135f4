"""On-call mail through a production-like relay: a real SMTP server (aiosmtpd) on loopback that
requires STARTTLS (a certificate from a test CA) and a login. The notifier verifies the
certificate, logs in only over TLS, reads the password from a 0600 file, and never shows it."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl

import pytest

from onerec.errors import UserError

PASSWORD = "s3cret-relay-password"


def _certificate(tmp_path):
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, key, signer, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "onerec test CA")])
    ca = build(ca_name, ca_name, ca_key, ca_key, ca=True)
    server = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, server_key, ca_key,
                   ca=False, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


@pytest.fixture
def relay(tmp_path):
    """The relay: STARTTLS required, AUTH only over TLS, one account; yields (port, CA file, received)."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    from ops.processes import free_port

    ca_file, cert, key = _certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    received, logins = [], []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append(envelope.content.decode())
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"oncall-bot" \
            and auth_data.password == PASSWORD.encode()
        logins.append(ok)
        return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535 itself

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True,
                            authenticator=authenticator, auth_require_tls=True)
    controller.start()
    try:
        yield port, str(ca_file), received, logins
    finally:
        controller.stop()


def _config(tmp_path, port, **fields):
    from tasks.config import PipelineConfig

    password = tmp_path / "smtp-password"
    if not password.exists():
        password.write_text(PASSWORD + "\n")
        os.chmod(password, 0o600)
    values = {"alert_smtp": f"127.0.0.1:{port}", "alert_smtp_starttls": True, "alert_smtp_user": "oncall-bot",
              "alert_smtp_password_file": str(password), **fields}
    return PipelineConfig.from_env({}, {"state_dir": str(tmp_path), **values})


def test_failure_mail_goes_through_starttls_and_login_and_never_shows_the_password(relay, tmp_path, caplog):
    from tasks.notify import send_failure

    port, ca_file, received, logins = relay
    caplog.set_level(logging.DEBUG)
    assert send_failure("[onerec-fp8] x failed", "body", _config(tmp_path, port, alert_smtp_ca_file=ca_file)) == {
        "smtp": "sent"}
    assert len(received) == 1 and "Subject: [onerec-fp8] x failed" in received[0] and logins == [True]

    # a certificate the notifier cannot verify (the test CA not given): nothing is sent, no login
    outcome = send_failure("s", "b", _config(tmp_path, port))["smtp"]
    assert outcome.startswith("failed:") and "CERTIFICATE_VERIFY_FAILED" in outcome and logins == [True]
    # a wrong password: refused by the relay, and the password appears nowhere
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    os.chmod(wrong, 0o600)
    outcome = send_failure("s", "b", _config(tmp_path, port, alert_smtp_ca_file=ca_file,
                                             alert_smtp_password_file=str(wrong)))["smtp"]
    # (smtplib tries each mechanism the relay offers: PLAIN, then LOGIN)
    assert outcome.startswith("failed: (535") and logins[0] and len(logins) > 1 and not any(logins[1:])
    attempts = len(logins)
    # a password file others can read is not used
    os.chmod(wrong, 0o644)
    outcome = send_failure("s", "b", _config(tmp_path, port, alert_smtp_ca_file=ca_file,
                                             alert_smtp_password_file=str(wrong)))["smtp"]
    assert "chmod 600" in outcome and len(logins) == attempts
    # no TLS configured: the relay refuses to take mail in clear
    outcome = send_failure("s", "b", _config(tmp_path, port, alert_smtp_starttls=False, alert_smtp_user="",
                                             alert_smtp_password_file=""))["smtp"]
    assert outcome.startswith("failed:") and len(received) == 1
    assert PASSWORD not in caplog.text and "not-the-password" not in caplog.text


def test_a_login_without_starttls_is_a_config_error(tmp_path):
    with pytest.raises(UserError, match="alert_smtp_starttls"):
        _config(tmp_path, 25, alert_smtp_starttls=False)
    with pytest.raises(UserError, match="alert_smtp_password_file"):
        _config(tmp_path, 25, alert_smtp_password_file="")
