"""Broker URLs (`consumer_svc._url`): parsed per the AMQP URI spec, printed without the password."""

import pytest

from consumer_svc._errors import ConfigurationError
from consumer_svc._secrets import redact
from consumer_svc._url import parse_url


@pytest.mark.parametrize(
    ("url", "host", "port", "vhost"),
    [
        ("amqp://localhost", "localhost", 5672, "/"),
        ("amqp://localhost/", "localhost", 5672, "/"),
        ("amqp://localhost:5673/%2F", "localhost", 5673, "/"),
        ("amqp://h/jobs", "h", 5672, "jobs"),
        ("amqp://h/a%2Fb", "h", 5672, "a/b"),
        ("amqps://h", "h", 5671, "/"),
    ],
)
def test_urls_follow_the_amqp_uri_spec(url: str, host: str, port: int, vhost: str) -> None:
    """Host, default port per scheme, and the vhost (empty path means "/")."""
    parsed = parse_url(url)
    assert (parsed.host, parsed.port, parsed.vhost) == (host, port, vhost)


def test_credentials_are_percent_decoded_and_hidden() -> None:
    """A password with special characters is decoded, and str() masks it."""
    parsed = parse_url("amqp://us%40er:p%3Ass@h:1/v")
    assert (parsed.username, parsed.password) == ("us@er", "p:ss")
    assert str(parsed) == "amqp://us%40er:***@h:1/v"
    assert "p:ss" not in repr(parsed)


def test_redact_masks_every_url_in_a_text() -> None:
    """Log lines that quote URLs lose their passwords."""
    text = "tried amqp://a:secret1@h1/ and amqps://b:secret2@h2:5671/v then gave up"
    assert redact(text) == "tried amqp://a:***@h1/ and amqps://b:***@h2:5671/v then gave up"


def test_a_url_without_host_is_refused() -> None:
    """amqp:/// names no broker."""
    with pytest.raises(ConfigurationError, match="no host"):
        parse_url("amqp:///vhost")
