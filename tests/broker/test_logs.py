"""Log lines through a real broker: a password a handler leaks is masked in every log format and in
the parked copy.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from support.amqp_tools import get_messages, publish
from support.twistd_support import Twistd

from consumer_svc.testing.rabbitmq import RabbitNode


def test_a_handler_leaking_the_password_is_masked_in_logs_and_parked_copies(
    rabbit: RabbitNode, queue_name: str, twistd: Callable[..., Twistd]
) -> None:
    """A handler whose exception quotes the service's URL and password: masked in the text log, JSON lines and the parked copy's header."""
    rabbit.add_user("leaky-svc", "Pw@with-at-sign!9")
    rabbit.set_permissions("/", "leaky-svc")
    url = f"amqp://leaky-svc:{quote('Pw@with-at-sign!9', safe='')}@127.0.0.1:{rabbit.amqp_port}/%2F"
    publish(rabbit.url(), queue_name, [b"one"])
    args = ["--queue", queue_name, "--handler", "support.handlers:leaky", "--max-retries", "0"]
    raw = f"amqp://leaky-svc:Pw@with-at-sign!9@127.0.0.1:{rabbit.amqp_port}/%2F"
    env = {"AMQP_URL": url, "LEAKED_URL": raw}
    text_run = twistd(args, env=env)
    text_run.wait_for_log("dead-lettering it to", 30)
    text_run.process.terminate()
    text_run.wait(30)
    publish(rabbit.url(), queue_name, [b"two"])
    json_run = twistd(args, env=env, twistd_args=("--logger", "consumer_svc.json_lines"))
    json_run.wait_for_log("dead-lettering it to", 30)
    json_run.process.terminate()
    json_run.wait(30)
    assert "Traceback (most recent call last)" in text_run.text()
    assert '"traceback": "Traceback (most recent call last)' in json_run.text()
    for run in (text_run, json_run):
        assert "with-at-sign" not in run.text()
        assert "amqp://leaky-svc:***@127.0.0.1" in run.text()
    parked = get_messages(rabbit.url(), f"{queue_name}.dead")
    assert len(parked) == 2
    for message in parked:
        failure = message.headers["consumer-svc-failure"]
        assert "with-at-sign" not in failure
        assert failure.startswith("ValueError: cannot reach amqp://leaky-svc:***@127.0.0.1")
