"""twistd plugin entry: ``Options`` and ``makeService`` for ``twistd consumer``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver
from twisted.python import usage

from ._errors import ExitStatus, FatalError
from ._handler import Handler, load_handler, log_message
from ._options import COMMAND_LINE, OPTIONS, Option
from ._secrets import install as install_redaction
from ._secrets import redact
from ._settings import Settings, resolve


class Options(usage.Options):
    """``twistd consumer`` options, made from the options table (`_options`)."""

    synopsis = "--queue NAME [options]"
    longdesc = (
        "Consume a RabbitMQ queue with a handler, acking each message only after the "
        "handler succeeded. Settings come from the command line, then the environment "
        "(CONSUMER_<OPTION>, AMQP_URL), then --config FILE's [consumer] section."
    )
    optFlags = [[o.name, o.short, o.usage] for o in COMMAND_LINE if o.flag]
    optParameters = [
        [o.name, o.short, None, o.usage] for o in COMMAND_LINE if not (o.flag or o.repeatable)
    ]
    # The repeatable options get an opt_ method each (below the class).

    settings: Settings
    handler: Handler

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self._repeated: dict[str, list[str]] = {o.name: [] for o in OPTIONS if o.repeatable}

    def postOptions(self) -> None:
        given: dict[str, Any] = {
            o.name: self[o.name] for o in OPTIONS if not (o.flag or o.repeatable)
        }
        # usage.Options counts a flag as 0 or 1; "not given" must be None, so that the
        # environment and the config file can set it.
        given.update({o.name: True if self[o.name] else None for o in OPTIONS if o.flag})
        given.update(self._repeated)
        self.settings = resolve(given, self._environ, self["config"])
        s = self.settings
        self.handler = load_handler(s.handler, s.handler_path) if s.handler else log_message

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, and turn any bad value into one line on stderr and an exit status."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            _exit_with(ExitStatus.CONFIG, str(e))
        except FatalError as e:
            _exit_with(e.status, str(e))


def _collector(option: Option) -> Callable[[Options, str], None]:
    """An ``opt_`` method that gathers each value of a repeatable option."""

    def collect(self: Options, value: str) -> None:
        self._repeated[option.name].append(value)

    collect.__doc__ = option.usage  # usage.Options shows it in --help
    return collect


for _option in OPTIONS:
    if _option.repeatable:
        setattr(Options, f"opt_{_option.attribute}", _collector(_option))


def _exit_with(status: ExitStatus, message: str) -> None:
    sys.stderr.write(f"twistd consumer: error: {redact(message)}\n")
    sys.stderr.flush()
    raise SystemExit(int(status))


class _Top(MultiService):
    """The service tree's root; under twistd it hands the application its text log observer."""

    def __init__(self, observer: ILogObserver | None) -> None:
        super().__init__()
        self._observer = observer

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # twistd uses an application's ILogObserver component unless --logger is given.
        if self._observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self._observer)


def _logging(options: Options) -> ILogObserver | None:
    """Apply --log-level to twistd's log: the text observer to use, or None to leave twistd's."""
    from ._log import configure, text_lines

    twistd = options.parent
    if twistd is None:
        return None
    configure(options.settings.log_level, twistd.get("logfile"), bool(twistd.get("nodaemon")))
    if twistd.get("logger") or twistd.get("syslog"):
        return None  # --logger consumer_svc.json_lines reads the same settings; syslog is twistd's
    return text_lines()


def makeService(options: Options) -> IService:
    """Wire the service tree; nothing connects until it is started."""
    from ._service import ConsumerService

    install_redaction()  # before twistd's log observers start: they see only masked events
    top = _Top(_logging(options))
    consumer = ConsumerService(options.settings, options.handler, signals=True)
    consumer.setServiceParent(top)
    s = options.settings
    if s.health_port is not None:
        from ._health import HealthServer

        HealthServer(s.health_host, s.health_port, consumer.health_site()).setServiceParent(top)
    return top
