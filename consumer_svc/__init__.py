"""consumer_svc: a long-running RabbitMQ consumer service on Twisted.

Handler authors need only these names; run the service with
``twistd consumer --queue NAME --handler package.module:function``.
"""

from ._context import keep_context
from ._errors import ExitStatus, Pause, PublishFailed, Reject, Retry, UndecodableBody
from ._handler import blocking
from ._log import json_lines
from ._message import Message

__all__ = [
    "ExitStatus",
    "Message",
    "Pause",
    "PublishFailed",
    "Reject",
    "Retry",
    "UndecodableBody",
    "blocking",
    "json_lines",
    "keep_context",
]
__version__ = "0.1.0"
