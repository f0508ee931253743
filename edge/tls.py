"""The TLS context of the MQTT connection, built the same way by the check and the publisher."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.config import MqttConfig


class TlsFileError(Exception):
    """Raised when a CA, certificate or key file cannot be loaded.

    Attributes:
        key: Dotted configuration key of the file at fault (``"mqtt.key_file"``).
    """

    def __init__(self, message: str, *, key: str) -> None:
        self.key = key
        super().__init__(message)


def uses_tls(mqtt: MqttConfig) -> bool:
    """Return whether the publisher connects with TLS (``tls``, or a ``ca_file`` set)."""
    return mqtt.tls or mqtt.ca_file is not None


def build_tls_context(mqtt: MqttConfig) -> ssl.SSLContext:
    """Build the client TLS context from ``mqtt.ca_file``, ``cert_file`` and ``key_file``.

    Without ``ca_file`` the system's CA certificates are trusted.

    Raises:
        TlsFileError: A file is unreadable, not PEM, or the key does not match the
            certificate or is encrypted.
    """
    ca_file = mqtt.ca_file
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        msg = (
            f"cannot load {ca_file} as PEM CA certificates ({_reason(exc)}); set "
            "mqtt.ca_file to the CA certificate of the broker in PEM"
        )
        raise TlsFileError(msg, key="mqtt.ca_file") from exc
    if mqtt.cert_file is None or mqtt.key_file is None:
        return context

    cert_file, key_file = mqtt.cert_file, mqtt.key_file
    try:
        # Parsing the file as a trust store separates a broken certificate from a broken key.
        ssl.create_default_context(cafile=str(cert_file))
    except (OSError, ssl.SSLError) as exc:
        msg = (
            f"cannot load {cert_file} as a PEM certificate ({_reason(exc)}); set "
            "mqtt.cert_file to the client certificate in PEM"
        )
        raise TlsFileError(msg, key="mqtt.cert_file") from exc

    def reject_password() -> str:
        # Without a callback OpenSSL would prompt for the passphrase on the terminal.
        msg = (
            f"{key_file} is encrypted, and the daemon cannot ask for its passphrase; "
            f"decrypt it (openssl pkey -in {key_file} -out KEY) and set mqtt.key_file to KEY"
        )
        raise TlsFileError(msg, key="mqtt.key_file")

    try:
        context.load_cert_chain(str(cert_file), str(key_file), password=reject_password)
    except (OSError, ssl.SSLError) as exc:
        msg = (
            f"cannot use {key_file} as the private key of {cert_file} ({_reason(exc)}); "
            "set mqtt.key_file to the PEM key that matches the certificate"
        )
        raise TlsFileError(msg, key="mqtt.key_file") from exc
    return context


def _reason(error: OSError | ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return error.strerror or str(error)
