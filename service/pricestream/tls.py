"""TLS for the gRPC port (optional): server credentials from PEM files, read once at start."""

from __future__ import annotations

from pathlib import Path

import grpc

from pricestream.settings import Settings, SettingsError


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`; mutual TLS when a client CA is configured."""
    chain = _read(settings.tls_cert_file, "TLS certificate")
    key = _read(settings.tls_key_file, "TLS key")
    client_ca = (
        _read(settings.tls_client_ca_file, "client CA bundle")
        if settings.tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


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
