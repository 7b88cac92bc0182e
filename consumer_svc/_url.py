"""Broker URLs: ``amqp://`` and ``amqps://`` parsed per the AMQP URI spec, shown without the password.

A vocabulary type, low in the package: the options, the connection, the tools
and the logs all speak of a `BrokerURL`, and none of them needs the options
table for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from ._errors import ConfigurationError
from ._secrets import redact, remember

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"


@dataclass(frozen=True)
class BrokerURL:
    """A parsed ``amqp://`` or ``amqps://`` URL; its `str` never shows the password."""

    scheme: str
    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)
    #: Whether the URL carried credentials at all (without, a client certificate means EXTERNAL).
    has_credentials: bool = True

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    def external_login(self, client_certificate: bool) -> bool:
        """Whether to log in with EXTERNAL: amqps://, a client certificate, no credentials here."""
        return self.tls and client_certificate and not self.has_credentials

    def __str__(self) -> str:
        auth = f"{quote(self.username, safe='')}:***@" if self.password else ""
        if not self.password and self.username:
            auth = f"{quote(self.username, safe='')}@"
        return f"{self.scheme}://{auth}{self.host}:{self.port}/{quote(self.vhost, safe='')}"


def parse_url(url: str) -> BrokerURL:
    """Parse a broker URL; the error message never repeats the password.

    The password is remembered for `redact`, so that it is masked wherever it
    shows up later (a handler's exception text, a traceback).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        host = parts.hostname
    except ValueError as e:
        raise ConfigurationError(f"--url is not a valid AMQP URL ({e}): {redact(url)}") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"--url must start with amqp:// or amqps://, got {redact(url)!r}")
    if not host:
        raise ConfigurationError(f"--url has no host: {redact(url)!r}")
    # RFC 3986 AMQP URIs: an empty path means the default vhost "/", and a
    # literal "/" in the vhost name is written %2F.
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = unquote(path) if path else "/"
    if parts.password is not None:
        remember(unquote(parts.password))
    return BrokerURL(
        scheme=parts.scheme,
        host=host,
        port=port or (5671 if parts.scheme == "amqps" else 5672),
        vhost=vhost,
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        has_credentials=parts.password is not None,
    )
