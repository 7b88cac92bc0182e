"""TLS to the broker, for the service and its tools alike: one policy, checked once.

The chain is verified against ``--tls-ca`` (else the system's trust store) and
the host name against the broker's certificate; with ``--tls-cert`` and
``--tls-key``, a client certificate goes along (mutual TLS). `check_tls_files`
loads the files as a client would, before anything connects. The service speaks
TLS through Twisted (`tls_options`), the short-lived tools through pika's
blocking connection and the standard library (`ssl_options`); both read the
files through the same functions here.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import ConfigurationError
from ._url import BrokerURL

if TYPE_CHECKING:
    import pika

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"


class TLSFiles(Protocol):
    """The TLS files an option set names (`Settings` and `Connection` both do)."""

    @property
    def tls_ca(self) -> str | None: ...

    @property
    def tls_cert(self) -> str | None: ...

    @property
    def tls_key(self) -> str | None: ...


def tls_options(files: TLSFiles) -> Callable[[BrokerURL], Any]:
    """Twisted's client TLS for each amqps:// URL: the chain and the host name verified
    (service-identity), with the client certificate if one is given."""
    from twisted.internet import ssl as twisted_ssl  # needs pyOpenSSL: only with amqps://

    trust: Any = twisted_ssl.platformTrust()
    certificates = _ca_certificates(files)
    if certificates is not None:
        trust = twisted_ssl.trustRootFromCertificates(
            [twisted_ssl.Certificate.loadPEM(pem) for pem in certificates]
        )
    client: Any = None
    pair = _client_pair(files)
    if pair is not None:
        client = twisted_ssl.PrivateCertificate.loadPEM(pair[0] + b"\n" + pair[1])

    def options(url: BrokerURL) -> Any:
        return twisted_ssl.optionsForClientTLS(url.host, trustRoot=trust, clientCertificate=client)

    return options


def ssl_options(files: TLSFiles) -> Callable[[BrokerURL], pika.SSLOptions]:
    """The same TLS for pika's own (blocking) connection: the standard library's
    verification of the chain and the host name, with the client certificate if one is given."""
    import pika

    certificates = _ca_certificates(files)
    cadata = None if certificates is None else b"\n".join(certificates).decode("ascii", "replace")
    context = ssl.create_default_context(cadata=cadata)
    if files.tls_cert and files.tls_key:
        # No password prompt: an encrypted key was refused by check_tls_files.
        context.load_cert_chain(files.tls_cert, files.tls_key, password=lambda: b"")

    def options(url: BrokerURL) -> pika.SSLOptions:
        return pika.SSLOptions(context, server_hostname=url.host)

    return options


def _ca_certificates(files: TLSFiles) -> list[bytes] | None:
    """The certificates (PEM, each with its markers) in --tls-ca; None for the system's."""
    if not files.tls_ca:
        return None
    with open(files.tls_ca, "rb") as f:
        return _pem_certificates(f.read())


def _client_pair(files: TLSFiles) -> tuple[bytes, bytes] | None:
    """The client certificate and its key (PEM), or None without both."""
    if not (files.tls_cert and files.tls_key):
        return None
    with open(files.tls_cert, "rb") as cert, open(files.tls_key, "rb") as key:
        return cert.read(), key.read()


def _pem_certificates(data: bytes) -> list[bytes]:
    return [part + _END for part in data.split(_END) if _BEGIN in part]


def check_tls_files(ca: str | None, cert: str | None, key: str | None) -> None:
    """Load the TLS files as a TLS client would, before anything connects.

    Raises `ConfigurationError` naming the file: not PEM, no certificate in
    it, a key that is encrypted or does not belong to the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigurationError(
                f"--tls-ca {ca!r} holds no usable CA certificate (PEM): {_reason(e)}"
            ) from None
        if not context.get_ca_certs():
            raise ConfigurationError(f"--tls-ca {ca!r} holds no CA certificate (PEM)")
    if cert and key:
        _check_client_pair(context, cert, key)


def _check_client_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        with open(cert, encoding="ascii", errors="replace") as f:
            ssl.PEM_cert_to_DER_cert(f.read())
    except (ValueError, OSError) as e:
        raise ConfigurationError(
            f"--tls-cert {cert!r} holds no certificate (PEM): {_reason(e)}"
        ) from None
    try:
        # No password prompt: an encrypted key fails here, as it would at connect time.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        raise ConfigurationError(
            f"--tls-key {key!r} is not a usable private key for --tls-cert {cert!r}: {_reason(e)}"
        ) from None


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason).replace("_", " ").lower()
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
