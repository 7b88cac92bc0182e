"""consumer_svc: a long-running RabbitMQ consumer service on Twisted.

Handler authors need only these names; run the service with
``twistd consumer --queue NAME --handler package.module:function``.
"""

from ._errors import ExitStatus, Reject, UndecodableBody
from ._handler import blocking
from ._message import Message

__all__ = ["ExitStatus", "Message", "Reject", "UndecodableBody", "blocking"]
__version__ = "0.1.0"
