"""TLS for the gRPC port (optional): the server's SSL context from PEM files, read once at
start, and client channels for the tools."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from pricestream.settings import Settings, SettingsError


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS for the gRPC port: TLS 1.2+, ALPN ``h2`` (gRPC clients insist on it), and mutual
    TLS when a client CA is configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION  # RFC 9113 9.2.1
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2 suites HTTP/2 permits
    context.set_alpn_protocols(["h2"])
    _read(settings.tls_cert_file, "TLS certificate")  # one clear sentence if unreadable
    _read(settings.tls_key_file, "TLS key")
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except ssl.SSLError as exc:
        raise SettingsError(f"cannot use the TLS certificate and key: {exc.reason}") from None
    if settings.tls_client_ca_file:
        _read(settings.tls_client_ca_file, "client CA bundle")
        try:
            context.load_verify_locations(settings.tls_client_ca_file)
        except ssl.SSLError as exc:
            raise SettingsError(f"cannot use the client CA bundle: {exc.reason}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def channel(
    target: str, ca_file: str = "", server_name: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.aio.Channel:
    """A client channel: TLS when a CA file is given (server_name overrides the checked name;
    cert_file and key_file present a client certificate for mutual TLS)."""
    if not ca_file:
        return grpc.aio.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA bundle"),
        private_key=_read(key_file, "client key") if key_file else None,
        certificate_chain=_read(cert_file, "client certificate") if cert_file else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(target, credentials, options=options)
