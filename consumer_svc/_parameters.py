"""pika's connection parameters for a broker URL: who we log in as, where, and by what name.

Shared by the service (pika's Twisted adapter, where host, port and TLS are
Twisted's business) and the dead-letters tool (pika's blocking connection, to
whose parameters it adds them), so that both log in the same way.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pika
import pika.credentials

from ._url import BrokerURL


def connection_parameters(
    url: BrokerURL, *, name: str, heartbeat: int | None = None, client_certificate: bool = False
) -> pika.ConnectionParameters:
    """The vhost, the credentials and the connection's name; no host, port or TLS.

    An amqps:// URL without credentials, with a client certificate, logs in
    with EXTERNAL: the broker takes the user from the certificate. ``heartbeat``
    None accepts the broker's proposal.
    """
    credentials: Any = pika.PlainCredentials(url.username, url.password)
    if url.external_login(client_certificate):
        credentials = pika.credentials.ExternalCredentials()
    return pika.ConnectionParameters(
        virtual_host=url.vhost,
        credentials=credentials,
        heartbeat=heartbeat,
        client_properties={
            "connection_name": f"{name} on {socket.gethostname()} pid {os.getpid()}",
            "product": "consumer_svc",
        },
    )
