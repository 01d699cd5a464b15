"""TLS towards upstream servers (DNS over TLS, RFC 7858): client contexts and failure reasons.

:func:`client_context` builds the :class:`ssl.SSLContext` of one ``tls://`` upstream from
its :class:`~dnsproxy.config_types.TlsConfig`: certificates verified against the system's
CA store or ``ca_file`` and the configured name checked (unless ``insecure``), TLS 1.2 or
newer, and an optional client certificate for mutual TLS. The same function checks the
files when the configuration is validated, so ``check-config`` sees what start-up would.

The context resumes TLS sessions: asyncio and uvloop both open a TLS connection with
``context.wrap_bio(...)`` and offer no way to hand it a session, so :class:`ClientContext`
supplies the last one it was given. A resumed handshake skips the certificate exchange
and its verification (measured in the README).

:func:`failure` turns an exception from a handshake into a short reason, used as a metric
label, and the text a log line shows.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from dnsproxy.config_types import TlsConfig
from dnsproxy.errors import DnsproxyError

__all__ = ["REASONS", "ClientContext", "TlsSetupError", "client_context", "failure", "quick_ack"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# Why a TLS connection was refused, as a metric label; "handshake" is everything that is
# not a verdict on the certificate (protocol version, an alert from the server, ...).
REASONS = ("expired", "not_yet_valid", "name_mismatch", "untrusted", "invalid", "handshake")

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) behind each reason; any other is "invalid".
_VERIFY_REASONS = {
    9: "not_yet_valid",  # CERT_NOT_YET_VALID
    10: "expired",  # CERT_HAS_EXPIRED
    2: "untrusted",  # UNABLE_TO_GET_ISSUER_CERT
    18: "untrusted",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "untrusted",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "untrusted",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "untrusted",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    27: "untrusted",  # CERT_UNTRUSTED
    62: "name_mismatch",  # HOSTNAME_MISMATCH
    64: "name_mismatch",  # IP_ADDRESS_MISMATCH
}


class TlsSetupError(DnsproxyError):
    """A TLS file cannot be used; ``key`` names its setting (``ca_file``, ...)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


class ClientContext(ssl.SSLContext):
    """An :class:`ssl.SSLContext` whose new connections resume ``session`` when set."""

    session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            session = self.session
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def client_context(config: TlsConfig) -> ClientContext:
    """The client context for an upstream with TLS settings ``config``.

    Raises :class:`TlsSetupError` naming the setting whose file cannot be read or used.
    """
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies and checks the name
    context.minimum_version = _VERSIONS[config.min_version]
    if config.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif config.ca_file is not None:
        try:
            context.load_verify_locations(cafile=config.ca_file)
        except ssl.SSLError:
            raise TlsSetupError("ca_file", f"{config.ca_file}: no PEM certificate in it") from None
        except OSError as exc:
            raise TlsSetupError("ca_file", _unreadable(config.ca_file, exc)) from None
    else:
        context.load_default_certs()
    if config.client_cert_file is not None:
        for key, path in (
            ("client_cert_file", config.client_cert_file),
            ("client_key_file", config.client_key_file),
        ):
            if path is not None:
                _readable(key, path)
        try:
            context.load_cert_chain(config.client_cert_file, config.client_key_file)
        except (ssl.SSLError, OSError):
            where = config.client_cert_file
            if config.client_key_file is not None:
                where += f" with the key in {config.client_key_file}"
            raise TlsSetupError(
                "client_cert_file", f"{where}: not a PEM certificate and its private key"
            ) from None
    return context


def failure(exc: BaseException) -> tuple[str, str] | None:
    """``(reason, text)`` when ``exc`` is a TLS failure, ``reason`` one of :data:`REASONS`;
    None for anything else (a refused or timed-out TCP connect)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code: Any = exc.verify_code
        reason = _VERIFY_REASONS.get(code, "invalid")
        return reason, f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return "handshake", f"TLS handshake failed: {_text(exc)}"
    return None


def quick_ack(transport: asyncio.BaseTransport) -> None:
    """Have the kernel acknowledge at once what arrives next on ``transport``'s socket.

    For a new TLS connection, once its first queries are written: a TLS 1.3 server sends
    its session tickets after our Finished, and one that leaves Nagle's algorithm on
    (Unbound does) holds its first reply until they are acknowledged, while Linux delays
    that ACK by up to 40 ms because we have just sent something ourselves. Measured
    against Unbound on loopback: the first reply on a new connection 42 ms without this,
    0.2 ms with it (``python -m benchmarks.handshake``). No-op where TCP_QUICKACK is
    missing.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    sock = transport.get_extra_info("socket")
    if option is not None and sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)
        except OSError:
            pass


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsSetupError(key, _unreadable(path, exc)) from None


def _unreadable(path: str, exc: OSError) -> str:
    return f"cannot read {path}: {exc.strerror or exc}"


def _text(exc: ssl.SSLError | OSError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)
