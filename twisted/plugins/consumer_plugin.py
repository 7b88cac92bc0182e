"""twistd plugin: ``twistd consumer --queue NAME`` (see consumer_svc.tap)."""

from twisted.application.service import ServiceMaker

consumer = ServiceMaker(
    "consumer_svc", "consumer_svc.tap", "Consume a RabbitMQ queue with a handler.", "consumer"
)
