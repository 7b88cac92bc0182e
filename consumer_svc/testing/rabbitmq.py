"""Throwaway RabbitMQ nodes for tests: start a private broker, break it on purpose, leave nothing.

Public: handler authors get it through the pytest plugin (`consumer_svc.testing.pytest_plugin`,
fixtures ``rabbitmq_node``, ``rabbitmq_url`` and ``rabbitmq_factory``) or use
:class:`RabbitNode` directly; the project's own tests build on the plugin (tests/conftest.py).

A :class:`RabbitNode` runs the real ``rabbitmq-server`` script (not Debian's wrapper, which
switches to the ``rabbitmq`` user) as the current user, with its own Erlang cookie, its own
``epmd`` on a free port and free AMQP and distribution ports, so it never touches a system
broker (which owns 5672, 4369 and 25672).

Every process a node spawns carries a marker in its environment. ``stop()``, an ``atexit``
hook and a small watchdog process find the node's processes by that marker and kill them; the
watchdog covers the cases where ``atexit`` never runs (the test process is SIGKILLed, or calls
``os._exit`` as pytest-timeout's thread method does). The marker is needed because Erlang's
``erl_child_setup`` and ``inet_gethost`` call ``setsid()``, so a process group misses them.

``version="3.10"`` (the default) is the host's package. ``version="4.0"`` is Debian 13's,
which needs a newer glibc than Debian 12 has, so every process of such a node (epmd, the
server, each ``rabbitmqctl``) runs chrooted into a Debian 13 root (``scripts/rabbitmq4-root.sh``
makes one under ``.tmp/``; ``RABBITMQ4_ROOT`` names another). Each runs through
``unshare --mount --propagation private``: the bind mounts it needs (``/proc``, and the node's
``base_dir`` at the same path inside the root) exist only in that process's own mount
namespace and vanish with its last process, however it ends. The marker goes through
``chroot`` in the environment, so cleanup works the same way.

A :class:`RabbitCluster` joins N such nodes of one version into one cluster: they share an
Erlang cookie and one epmd of the cluster's own.

Only the standard library is imported, so importing this module never installs a reactor.
Run as a script it serves a node in the foreground for ``make run``::

    python -m consumer_svc.testing.rabbitmq serve --port 5672 --dir .tmp/local-broker
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol
from urllib.parse import quote

__all__ = [
    "DEFAULT_RABBITMQ4_ROOT",
    "DEFAULT_VERSION",
    "VERSIONS",
    "ClusterQueue",
    "ConnectionInfo",
    "CtlError",
    "QueueStats",
    "RabbitCluster",
    "RabbitNode",
    "RabbitNodeError",
    "find_rabbitmq_scripts",
    "free_port",
    "rabbitmq4_root",
]

#: The RabbitMQ series a node can run: the host's package, and Debian 13's in a chroot.
VERSIONS = ("3.10", "4.0")
DEFAULT_VERSION = "3.10"

_MARKER = "RABBITNODE_TAG"
_DEFAULT_WATERMARK = "0.4"
_START_MARK = "=== rabbitmq.py: start"
_CTL_PORTS = 5  # concurrent rabbitmqctl invocations a node allows
_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()


class RabbitNodeError(RuntimeError):
    """A node did not start, stop or answer as expected; the message ends with its log."""


class CtlError(RabbitNodeError):
    """A ``rabbitmqctl`` command failed or timed out."""

    def __init__(self, args: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        self.args_ = tuple(args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(
            f"rabbitmqctl {' '.join(args)} {status}:\n{stderr.strip() or stdout.strip()}"
        )


@dataclass(frozen=True)
class QueueStats:
    """Counts for one queue, as ``rabbitmqctl list_queues`` reports them."""

    messages_ready: int
    messages_unacknowledged: int
    consumers: int


@dataclass(frozen=True)
class ClusterQueue:
    """Where a queue lives in a cluster, as ``rabbitmqctl list_queues`` reports it."""

    name: str
    type: str  # "classic", "quorum", "stream"
    leader: str | None  # the node of a classic queue, the leader of a quorum queue
    members: tuple[str, ...]  # every replica's node; empty for a classic queue on 3.10

    @classmethod
    def from_row(cls, row: dict[str, object]) -> ClusterQueue:
        members = row.get("members")
        leader = row.get("leader")
        return cls(
            name=str(row["name"]),
            type=str(row["type"]),
            leader=str(leader) if leader else None,
            members=tuple(sorted(map(str, members))) if isinstance(members, list) else (),
        )


@dataclass(frozen=True)
class ConnectionInfo:
    """One client connection, as ``rabbitmqctl list_connections`` reports it."""

    pid: str  # Erlang pid such as "<rmq-1a2b@localhost.1700000000.712.0>"
    name: str  # "127.0.0.1:40684 -> 127.0.0.1:5699"
    user: str
    vhost: str
    state: str  # running, blocking, blocked, closing ...
    peer_port: int
    client_name: str | None  # the client's ``connection_name`` property, if it sent one


class _Deadline:
    """A point in monotonic time that several waits share."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self, floor: float = 0.0) -> float:
        return max(floor, self._end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._end


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now and not handed out before by us."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        with _ports_lock:
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise RabbitNodeError("no free TCP port found on 127.0.0.1")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_block(count: int) -> int:
    """Return the first of ``count`` consecutive free ports."""
    for _ in range(100):
        first = free_port()
        rest = range(first + 1, first + count)
        with _ports_lock:
            taken = any(p in _ports_handed_out or p > 65535 for p in rest)
        if not taken and all(_port_is_free(p) for p in rest):
            with _ports_lock:
                _ports_handed_out.update(rest)
            return first
    raise RabbitNodeError(f"no block of {count} free TCP ports found on 127.0.0.1")


#: Where 4.0 nodes look for their Debian 13 root when ``$RABBITMQ4_ROOT`` is not set
#: (relative paths from the current directory); tests/conftest.py points it at the checkout.
DEFAULT_RABBITMQ4_ROOT = Path(".tmp", "debian13-root")


def rabbitmq4_root() -> Path:
    """The Debian 13 root that 4.0 nodes run in: ``$RABBITMQ4_ROOT`` or `DEFAULT_RABBITMQ4_ROOT`."""
    given = os.environ.get("RABBITMQ4_ROOT")
    if given:
        return Path(given).resolve()
    return DEFAULT_RABBITMQ4_ROOT.resolve()


def find_rabbitmq_scripts(root: Path | None = None) -> tuple[Path, Path]:
    """Find the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts (not Debian's wrapper).

    With ``root``, look inside that root and return the paths as seen from inside it.
    """
    if root is not None:
        found = sorted(glob.glob(f"{root}/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))
        for d in map(Path, reversed(found)):  # the newest, should there be several
            if (d / "rabbitmq-server").is_file() and (d / "rabbitmqctl").is_file():
                inside = Path("/") / d.relative_to(root)
                return inside / "rabbitmq-server", inside / "rabbitmqctl"
        raise RabbitNodeError(
            f"no RabbitMQ in {root} (usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin); "
            "run scripts/rabbitmq4-root.sh, which `make bootstrap` runs"
        )
    dirs = [Path("/usr/lib/rabbitmq/bin")]
    dirs += [Path(p) for p in sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))]
    found_ = shutil.which("rabbitmq-server", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found_:
        real = Path(found_).resolve()
        # Debian's /usr/sbin/rabbitmq-server links to a wrapper that su's to "rabbitmq".
        if real.name != "rabbitmq-script-wrapper":
            dirs.append(real.parent)
    for d in dirs:
        server, ctl = d / "rabbitmq-server", d / "rabbitmqctl"
        if (
            server.is_file()
            and ctl.is_file()
            and "rabbitmq-script-wrapper" not in str(server.resolve())
        ):
            return server, ctl
    raise RabbitNodeError(
        "RabbitMQ is not installed: no rabbitmq-server script in /usr/lib/rabbitmq/bin, "
        "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin or PATH "
        "(on Debian: apt-get install --no-install-recommends rabbitmq-server)"
    )


def _find_epmd(root: Path | None = None) -> Path:
    prefix = str(root or "")
    found = None if root else shutil.which("epmd")
    candidates = [found] if found else []
    candidates += [
        f"{prefix}/usr/lib/erlang/bin/epmd",
        *sorted(glob.glob(f"{prefix}/usr/lib/erlang/erts-*/bin/epmd")),
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return Path("/") / Path(c).relative_to(root) if root else Path(c)
    raise RabbitNodeError(f"epmd not found{f' in {root}' if root else ''} (package erlang-base)")


# Run inside a private mount namespace (unshare): bind /proc and the given host folders at the
# same paths inside the root, then chroot. The mounts die with the namespace's last process.
# The mount points made in the root stay as empty folders; _Install.forget_binds removes them.
_CHROOT_SCRIPT = """
root=$1 cwd=$2 n=$3
shift 3
mount --bind /proc "$root/proc"
while [ "$n" -gt 0 ]; do
    mkdir -p "$root$1"
    mount --bind "$1" "$root$1"
    shift
    n=$((n - 1))
done
exec chroot "$root" /usr/bin/env --chdir="$cwd" "$@"
"""


@dataclass(frozen=True)
class _Install:
    """Where one RabbitMQ version's programs are, and how to run them."""

    series: str  # "3.10", "4.0": what was asked for
    version: str  # "4.0.5": the package's
    root: Path | None  # None: the host's own package
    server: Path  # paths as seen by the program, i.e. inside ``root``
    ctl: Path
    epmd: Path

    @classmethod
    def find(cls, series: str) -> _Install:
        if series not in VERSIONS:
            raise RabbitNodeError(f"unknown RabbitMQ version {series!r}; known: {VERSIONS}")
        root = None
        if series != DEFAULT_VERSION:
            root = rabbitmq4_root()
            if not (root / "usr").is_dir():
                raise RabbitNodeError(
                    f"RabbitMQ {series} needs the Debian 13 root {root}, which is missing: "
                    "run scripts/rabbitmq4-root.sh (`make bootstrap` does) or set RABBITMQ4_ROOT"
                )
            for tool in ("unshare", "chroot", "mount"):
                if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
                    raise RabbitNodeError(f"RabbitMQ {series} in a chroot needs {tool}")
        server, ctl = find_rabbitmq_scripts(root)
        host_server = (root / server.relative_to("/")) if root else server
        # .../lib/rabbitmq_server-4.0.5/sbin/rabbitmq-server
        package = host_server.resolve().parent.parent.name
        version = package.removeprefix("rabbitmq_server-")
        if not version.startswith(series + "."):
            where = root or "this host"
            raise RabbitNodeError(f"RabbitMQ {series} wanted, but {where} has {package}")
        return cls(series, version, root, server, ctl, _find_epmd(root))

    def command(
        self, argv: Sequence[str], binds: Sequence[Path] = (), cwd: Path = Path("/")
    ) -> list[str]:
        """``argv`` as run for this install: as is on the host, else chrooted (see above)."""
        if self.root is None:
            return list(argv)
        return [
            "unshare", "--mount", "--propagation", "private",
            "sh", "-ec", _CHROOT_SCRIPT, "sh", str(self.root), str(cwd), str(len(binds)),
            *map(str, binds), *argv,
        ]  # fmt: skip

    def forget_binds(self, binds: Sequence[Path]) -> None:
        """Remove the empty mount-point folders ``command`` left in the root (best effort)."""
        if self.root is None:
            return
        for bind in binds:
            inside = self.root / bind.relative_to("/")
            # Never a top-level folder of the root (its /tmp), never a non-empty one.
            while inside.parent != self.root and inside != self.root:
                try:
                    if os.path.ismount(inside):
                        break
                    inside.rmdir()
                except OSError:
                    break
                inside = inside.parent


def _pids_with_marker(prefix: str) -> list[int]:
    """Pids of live processes whose environment has ``RABBITNODE_TAG=<prefix>...``."""
    needle = f"{_MARKER}={prefix}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone, or another user's process
            continue
        if environ.startswith(needle) or b"\0" + needle in environ:
            pids.append(int(entry.name))
    return pids


def _running(pid: int) -> bool:
    """True until ``pid`` has ended: gone, or a zombie waiting to be reaped.

    A process in the middle of exiting has already dropped its memory, so its environment
    reads empty and ``_pids_with_marker`` no longer sees it, yet it may still hold its
    sockets for a while; this looks at its state instead.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _kill_marked(prefix: str, wait: float = 10.0) -> list[int]:
    """SIGKILL every process marked with ``prefix`` until none is left; return those killed.

    Returns only once each of them has ended, not merely stopped showing its marker.
    """
    killed: list[int] = []
    deadline = _Deadline(wait)
    while True:
        pids = _pids_with_marker(prefix)
        exiting = [pid for pid in killed if pid not in pids and _running(pid)]
        if not pids and not exiting:
            return killed
        if deadline.expired:
            raise RabbitNodeError(f"processes {pids or exiting} ({prefix}) survived SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        time.sleep(0.05)


def _epmd_names(port: int, timeout: float = 1.0) -> list[str] | None:
    """Node names registered with the epmd on ``port``, or None if it does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"\x00\x01n")  # NAMES_REQ
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
    except OSError:
        return None
    reply = b"".join(chunks)
    if len(reply) < 4:
        return None
    # Lines look like "name rmq-1a2b at port 41234".
    return [line.split()[1] for line in reply[4:].decode().splitlines() if line.startswith("name ")]


def _amqp_answers(port: int, timeout: float = 1.0) -> bool:
    """True if something on ``port`` answers an AMQP 0-9-1 header with a method frame."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(1)[:1] == b"\x01"  # frame type 1: Connection.Start
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


def _first_errors(path: Path, since: str, lines: int = 15) -> str:
    """The first error lines after the last ``since`` line: the cause, before the crash noise."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    start = text.rfind(since)
    found = [
        line
        for line in text[max(start, 0) :].splitlines()
        if "[error]" in line or "BOOT FAILED" in line or line.startswith("Error")
    ]
    return "\n".join(found[:lines])


def _base_env() -> dict[str, str]:
    """The caller's environment without anything that would make a node a system node's twin."""
    # Drop the caller's RabbitMQ/Erlang settings (and systemd's, which would make the
    # script exec the VM and notify systemd) so nothing of a system node leaks in.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RABBITMQ_", "ERL_"))
        and k not in {"NOTIFY_SOCKET", "CONF_ENV_FILE", "NODENAME", "HOME"}
    }
    if not (env.get("LC_ALL") or env.get("LANG")):
        env["LC_ALL"] = "C.UTF-8"  # else the Erlang VM warns about latin1 file names
    return env


class _Watchdog:
    """A process that kills everything marked ``tag`` if we die without disarming it."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._proc: subprocess.Popen[bytes] | None = None

    def arm(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        # Its own session: a Ctrl-C in the terminal must not kill it before the node.
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "_watchdog", self.tag],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def disarm(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.write(b"disarm\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Epmd:
    """An epmd of our own on a free port (the system's owns 4369), marked ``marker``."""

    def __init__(self, install: _Install, log: Path, marker: str) -> None:
        self.install = install
        self.port = free_port()
        self.log = log
        self.marker = marker
        self._proc: subprocess.Popen[bytes] | None = None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, deadline: _Deadline) -> None:
        if self.is_running():
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(self.install.epmd), "-port", str(self.port), "-address", "127.0.0.1"]
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                self.install.command(argv),
                env={**_base_env(), _MARKER: self.marker},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while _epmd_names(self.port) is None:
            if self._proc.poll() is not None or deadline.expired:
                raise RabbitNodeError(
                    f"epmd on port {self.port} did not start:\n" + _tail(self.log)
                )
            time.sleep(0.02)

    def stop(self) -> None:
        _kill_marked(self.marker)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        self._proc = None


class _Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> None: ...

    def _kill_everything(self) -> None: ...


_live_nodes: set[_Stoppable] = set()  # nodes and clusters, stopped at exit
_live_lock = threading.Lock()


@atexit.register
def _stop_live_nodes() -> None:
    with _live_lock:
        nodes = list(_live_nodes)
    for node in nodes:
        try:
            node.stop(timeout=15)
        except Exception:  # atexit must go on to the next node
            with contextlib.suppress(Exception):
                node._kill_everything()


class RabbitNode:
    """A private RabbitMQ node under ``base_dir``, listening on 127.0.0.1 only.

    Data (``mnesia/``) survives ``kill()`` + ``start()`` and ``restart_app()``, since the node
    name, ports and directories stay the same for the object's lifetime. All methods block,
    and all are bounded by timeouts; call them from a thread in Twisted tests.

    ``version`` picks the RabbitMQ series ("3.10": the host's package; "4.0": Debian 13's, run
    in a chroot, see the module docstring); ``base_dir`` must then not lie inside that root,
    and files that ``config`` names must lie under ``base_dir`` or under one of ``binds``,
    host folders that the node sees at the same paths. ``cookie`` and ``epmd`` are for
    :class:`RabbitCluster`, whose nodes share both.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        config: Iterable[str] = (),
        amqp_port: int | None = None,
        nodename: str | None = None,
        start_timeout: float = 60.0,
        advanced: str = "",
        plugins: Iterable[str] = (),
        version: str = DEFAULT_VERSION,
        binds: Iterable[str | os.PathLike[str]] = (),
        cookie: str | None = None,
        epmd: _Epmd | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self._binds = [self.base_dir, *(Path(b).resolve() for b in binds)]
        self._install = _Install.find(version)
        #: The series asked for: "3.10" or "4.0".
        self.series = self._install.series
        #: The package's full version, e.g. "4.0.5" (the running node's: :meth:`running_version`).
        self.version = self._install.version
        if self._install.root is not None and self.base_dir.is_relative_to(self._install.root):
            raise RabbitNodeError(f"base_dir {self.base_dir} lies inside {self._install.root}")
        self.cookie = cookie or "".join(secrets.choice(string.ascii_uppercase) for _ in range(32))
        self.config = tuple(config)
        #: Erlang terms for advanced.config, for settings rabbitmq.conf cannot express,
        #: e.g. ``[{rabbit, [{channel_tick_interval, 1000}]}].``
        self.advanced = advanced
        #: Plugins to enable, e.g. ``rabbitmq_auth_mechanism_ssl`` for EXTERNAL.
        self.plugins = tuple(plugins)
        self.nodename = nodename or f"rmq-{secrets.token_hex(4)}@localhost"
        if "@" not in self.nodename:
            self.nodename += "@localhost"
        self.amqp_port = amqp_port or free_port()
        self.dist_port = free_port()
        self.ctl_port_min = _free_port_block(_CTL_PORTS)
        self.start_timeout = start_timeout
        self._tag = secrets.token_hex(8)
        # A shared epmd (a cluster's) is neither started nor stopped by the node.
        self._own_epmd = epmd is None
        self._epmd = epmd or _Epmd(self._install, self.base_dir / "epmd.log", f"{self._tag}:epmd")
        self.epmd_port = self._epmd.port
        self._server: subprocess.Popen[bytes] | None = None
        self._watchdog = _Watchdog(self._tag)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return (
            f"<RabbitNode {self.nodename} RabbitMQ {self.version}"
            f" amqp=127.0.0.1:{self.amqp_port} {state}>"
        )

    # -- paths and environment -------------------------------------------------------------

    @property
    def home(self) -> Path:
        return self.base_dir / "home"

    @property
    def server_log(self) -> Path:
        """stdout and stderr of ``rabbitmq-server``, appended across restarts."""
        return self.base_dir / "server.log"

    @property
    def node_log(self) -> Path:
        """The broker's own log file."""
        return self.base_dir / "log" / f"{self.nodename}.log"

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        """An ``amqp://`` URL for this node (the vhost percent-encoded: "/" becomes %2F)."""
        return (
            f"amqp://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@127.0.0.1:{self.amqp_port}/{quote(vhost, safe='')}"
        )

    def _env(self, role: str) -> dict[str, str]:
        env = _base_env()
        b = self.base_dir
        loopback_dist = "-kernel inet_dist_use_interface {127,0,0,1}"
        env.update(
            {
                # How stop(), kill() and the watchdog find every process of this node.
                _MARKER: f"{self._tag}:{role}",
                "HOME": str(self.home),  # the private .erlang.cookie lives there
                "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_port_min),
                "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_port_min + _CTL_PORTS - 1),
                "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
                "RABBITMQ_LOG_BASE": str(b / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
                "RABBITMQ_PID_FILE": str(b / "rabbitmq.pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback_dist,
                "RABBITMQ_CTL_ERL_ARGS": loopback_dist,
            }
        )
        return env

    def _prepare_dirs(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists() or cookie.read_text() != self.cookie:
            cookie.unlink(missing_ok=True)
            cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (self.base_dir / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        advanced = self.base_dir / "advanced.config"
        if self.advanced:
            advanced.write_text(self.advanced.strip() + "\n")
        elif advanced.exists():
            advanced.unlink()
        (self.base_dir / "rabbitmq-env.conf").write_text("")  # shadows /etc/rabbitmq's
        conf = [
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            "loopback_users = none",
            *self.config,
        ]
        (self.base_dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")

    # -- life cycle -------------------------------------------------------------------------

    def is_running(self) -> bool:
        """True while the server process we started is alive."""
        return self._server is not None and self._server.poll() is None

    def start(self, timeout: float | None = None) -> RabbitNode:
        """Start the node (again, after ``stop()`` or ``kill()``) and wait until AMQP answers."""
        with self._lock:
            if self.is_running():
                return self
            deadline = _Deadline(timeout or self.start_timeout)
            try:
                self._prepare_dirs()
                with _live_lock:
                    _live_nodes.add(self)
                self._watchdog.arm()
                self._ensure_epmd(deadline)
                self._wait_unregistered(deadline)
                with open(self.server_log, "ab") as log:
                    log.write(f"\n{_START_MARK} {time.strftime('%H:%M:%S')} ===\n".encode())
                    log.flush()
                    self._server = subprocess.Popen(
                        self._command([str(self._install.server)]),
                        env=self._env("server"),
                        cwd=self.base_dir,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                self._wait_registered(deadline)
                wait = int(deadline.remaining(1))
                self.ctl("await_startup", "--timeout", str(wait), timeout=wait + 5)
                self._wait_amqp(deadline)
            except BaseException as e:
                detail = self._logs()
                with contextlib.suppress(Exception):
                    self._kill_everything()
                if isinstance(e, Exception):
                    raise RabbitNodeError(f"{self.nodename} did not start: {e}\n{detail}") from e
                raise
            return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node gracefully (SIGKILL what lingers), then its epmd. Idempotent."""
        with self._lock:
            deadline = _Deadline(timeout)
            server = self._server
            if server is not None and server.poll() is None:
                with contextlib.suppress(RabbitNodeError, OSError):
                    self.ctl("stop", timeout=deadline.remaining(1))
                try:
                    server.wait(timeout=deadline.remaining(0.1))
                except subprocess.TimeoutExpired:
                    # The script's TERM trap stops the VM gracefully; SIGKILL if that fails.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(server.pid, signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        server.wait(timeout=min(10.0, deadline.remaining(0.1)))
            self._kill_everything()

    def kill(self) -> None:
        """SIGKILL the broker's processes (a crash: "kill -9"); ``start()`` brings it back."""
        with self._lock:
            _kill_marked(f"{self._tag}:server")
            if self._server is not None:
                self._server.wait(timeout=10)
            # epmd frees the name when it sees the VM's connection close, which on a busy
            # machine can take a moment; until then a new VM of that name cannot register,
            # and start() would mistake the old registration for the new node.
            self._wait_unregistered(_Deadline(10))

    def _kill_everything(self) -> None:
        """Kill the server, any rabbitmqctl in flight and our epmd; disarm the watchdog."""
        _kill_marked(f"{self._tag}:")
        if self._server is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server.wait(timeout=5)
        self._server = None
        if self._own_epmd:
            self._epmd.stop()
        self._install.forget_binds(self._binds)
        self._watchdog.disarm()
        with _live_lock:
            _live_nodes.discard(self)

    def _command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as run for this node's version: in the Debian 13 root for 4.0."""
        return self._install.command(argv, binds=self._binds, cwd=self.base_dir)

    def _ensure_epmd(self, deadline: _Deadline) -> None:
        if self._own_epmd:
            self._epmd.start(deadline)
        elif not self._epmd.is_running():
            raise RabbitNodeError(f"the shared epmd on port {self.epmd_port} is not running")

    def _check_alive(self) -> None:
        if self._server is None or self._server.poll() is not None:
            rc = None if self._server is None else self._server.returncode
            raise RabbitNodeError(f"the node exited (rabbitmq-server script status {rc})")

    def _wait_unregistered(self, deadline: _Deadline) -> None:
        short = self.nodename.split("@")[0]
        while short in (_epmd_names(self.epmd_port) or []):
            if deadline.expired:
                raise RabbitNodeError(
                    f"{self.nodename} still registered with epmd {deadline.seconds} s after "
                    "its VM ended"
                )
            time.sleep(0.05)

    def _wait_registered(self, deadline: _Deadline) -> None:
        short = self.nodename.split("@")[0]
        while short not in (_epmd_names(self.epmd_port) or []):
            self._check_alive()
            if deadline.expired:
                raise RabbitNodeError(f"not registered with epmd after {deadline.seconds} s")
            time.sleep(0.1)

    def _wait_amqp(self, deadline: _Deadline) -> None:
        while not _amqp_answers(self.amqp_port):
            self._check_alive()
            if deadline.expired:
                raise RabbitNodeError(
                    f"AMQP port {self.amqp_port} silent after {deadline.seconds} s"
                )
            time.sleep(0.05)

    def _logs(self) -> str:
        parts = []
        errors = _first_errors(self.server_log, since=_START_MARK)
        if errors:
            parts.append(f"--- {self.server_log} (first errors) ---\n{errors}")
        parts.append(f"--- {self.server_log} (tail) ---\n{_tail(self.server_log, 25)}")
        if self.node_log.exists():
            parts.append(f"--- {self.node_log} (tail) ---\n{_tail(self.node_log, 25)}")
        return "\n".join(parts)

    def leftover_pids(self) -> list[int]:
        """Pids of live processes this node spawned (server, epmd, rabbitmqctl)."""
        return _pids_with_marker(f"{self._tag}:")

    def __enter__(self) -> RabbitNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the broker application -------------------------------------------------------------

    def stop_app(self, timeout: float = 30.0) -> None:
        """Stop the RabbitMQ application (connections drop, the VM stays up)."""
        self.ctl("stop_app", timeout=timeout)

    def start_app(self, timeout: float = 60.0) -> None:
        """Start the RabbitMQ application and wait until AMQP answers again."""
        deadline = _Deadline(timeout)
        self.ctl("start_app", timeout=deadline.remaining(1))
        self._wait_amqp(deadline)

    def restart_app(self, timeout: float = 60.0) -> None:
        """``stop_app`` then ``start_app``: durable queues and persistent messages remain."""
        deadline = _Deadline(timeout)
        self.stop_app(timeout=deadline.remaining(1))
        self.start_app(timeout=deadline.remaining(1))

    # -- rabbitmqctl ------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` with this node's environment; return stdout."""
        # rabbitmqctl starts an "epmd -daemon" on ERL_EPMD_PORT when none answers there
        # (even with -start_epmd false), so never run it without our epmd.
        if self._server is None or not self._epmd.is_running():
            raise RabbitNodeError(f"{self.nodename} is not started")
        argv = [str(self._install.ctl), "-n", self.nodename, *args]
        proc = subprocess.Popen(
            self._command(argv),
            env=self._env("ctl"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise CtlError(
                args, None, out.decode(errors="replace"), err.decode(errors="replace")
            ) from e
        if proc.returncode != 0:
            raise CtlError(
                args, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
            )
        return out.decode(errors="replace")

    def _ctl_json(self, *args: str, timeout: float = 30.0) -> object:
        return json.loads(self.ctl(*args, "--formatter", "json", timeout=timeout))

    def list_queues(self, vhost: str = "/") -> dict[str, QueueStats]:
        """Queue name -> counts, read from the queue processes (no statistics delay)."""
        fields = ("messages_ready", "messages_unacknowledged", "consumers")
        rows = self._ctl_json("list_queues", "-q", "-p", vhost, "name", *fields)
        assert isinstance(rows, list)
        return {r["name"]: QueueStats(*(int(r[f]) for f in fields)) for r in rows}

    def list_connections(self) -> list[ConnectionInfo]:
        """Client connections on this node, in all vhosts."""
        # JSON shows pids as "#PID<…>", which close_connection does not accept; the table
        # format prints them as "<node.N.M.K>". Client properties come from JSON.
        fields = ("pid", "name", "user", "vhost", "state", "peer_port")
        table = self.ctl("list_connections", "-q", "--no-table-headers", *fields)
        rows = json.loads(
            self.ctl("list_connections", "-q", "--formatter", "json", "name", "client_properties")
        )
        client_names: dict[str, str | None] = {}
        for row in rows:
            props = {p[0]: p[2] for p in row.get("client_properties") or []}
            client_names[row["name"]] = props.get("connection_name")
        conns = []
        for line in table.splitlines():
            if not line.strip():
                continue
            pid, name, user, vhost, state, peer_port = line.split("\t")
            conns.append(
                ConnectionInfo(
                    pid, name, user, vhost, state, int(peer_port), client_names.get(name)
                )
            )
        return conns

    def close_connection(self, conn: ConnectionInfo | str, reason: str = "closed by test") -> None:
        """Close one connection (given as ConnectionInfo or Erlang pid) with CONNECTION_FORCED."""
        pid = conn.pid if isinstance(conn, ConnectionInfo) else conn
        self.ctl("close_connection", pid, reason)

    def close_all_connections(self, reason: str = "closed by test") -> None:
        """Close every client connection in every vhost with 320 CONNECTION_FORCED."""
        self.ctl("close_all_connections", "--global", reason)

    def add_user(self, user: str, password: str) -> None:
        self.ctl("add_user", user, password)

    def add_vhost(self, name: str) -> None:
        self.ctl("add_vhost", name)

    def set_permissions(
        self, vhost: str, user: str, conf: str = ".*", write: str = ".*", read: str = ".*"
    ) -> None:
        self.ctl("set_permissions", "-p", vhost, user, conf, write, read)

    def delete_queue(self, name: str, vhost: str = "/") -> None:
        """Delete a queue; its consumers get ``basic.cancel`` (ConsumerCancelled in pika)."""
        self.ctl("delete_queue", "-p", vhost, name)

    def running_version(self) -> str:
        """The RabbitMQ version the running node reports (``rabbitmqctl status``)."""
        status = self._ctl_json("status")
        assert isinstance(status, dict)
        return str(status["rabbitmq_version"])

    # -- clustering -------------------------------------------------------------------------

    def join_cluster(self, other: RabbitNode, timeout: float = 90.0) -> None:
        """Reset this node and join ``other``'s cluster (same cookie and epmd needed)."""
        deadline = _Deadline(timeout)
        self.stop_app(timeout=deadline.remaining(1))
        self.ctl("reset", timeout=deadline.remaining(1))
        self.ctl("join_cluster", other.nodename, timeout=deadline.remaining(1))
        self.start_app(timeout=deadline.remaining(1))

    def running_nodes(self) -> list[str]:
        """Names of the cluster's nodes that this node sees running, itself included."""
        status = self._ctl_json("cluster_status")
        assert isinstance(status, dict)
        return sorted(status["running_nodes"])

    def queue_placement(self, vhost: str = "/") -> dict[str, ClusterQueue]:
        """Queue name -> type, leader and members (replicas), as this node sees them."""
        rows = self._ctl_json("list_queues", "-q", "-p", vhost, "name", "type", "leader", "members")
        assert isinstance(rows, list)
        return {r["name"]: ClusterQueue.from_row(r) for r in rows}

    def alarms(self) -> list[str]:
        """Resources currently in alarm, e.g. ``["memory"]``."""
        status = self._ctl_json("status")
        assert isinstance(status, dict)
        return sorted(a["resource"] for a in status.get("alarms") or [])

    def set_memory_alarm(self, on: bool, timeout: float = 10.0) -> None:
        """Raise (watermark 0) or clear (watermark 0.4) a memory alarm; wait until it shows."""
        deadline = _Deadline(timeout)
        self.ctl("set_vm_memory_high_watermark", "0" if on else _DEFAULT_WATERMARK)
        while ("memory" in self.alarms()) != on:
            if deadline.expired:
                raise RabbitNodeError(f"memory alarm not {'on' if on else 'off'} in {timeout} s")
            time.sleep(0.1)


class RabbitCluster:
    """``size`` private nodes of one RabbitMQ version, joined into one cluster.

    The nodes share an Erlang cookie and an epmd of the cluster's own (which outlives any one
    node being stopped or killed); each has its own ports, node name and ``base_dir/nK``.
    Node 0 is the seed: the others ``stop_app; reset; join_cluster`` it. ``config`` and the
    other keywords go to every :class:`RabbitNode`. All methods block and are bounded.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        size: int = 3,
        *,
        version: str = DEFAULT_VERSION,
        config: Iterable[str] = (),
        start_timeout: float = 120.0,
        **node_kwargs: Any,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs a node")
        self.base_dir = Path(base_dir).resolve()
        self.start_timeout = start_timeout
        self._tag = secrets.token_hex(8)
        install = _Install.find(version)
        self._epmd = _Epmd(install, self.base_dir / "epmd.log", f"{self._tag}:epmd")
        self._watchdog = _Watchdog(self._tag)
        cookie = "".join(secrets.choice(string.ascii_uppercase) for _ in range(32))
        prefix = f"rmqc-{secrets.token_hex(3)}"
        self.nodes = [
            RabbitNode(
                self.base_dir / f"n{i}",
                config=config,
                nodename=f"{prefix}-{i}@localhost",
                version=version,
                cookie=cookie,
                epmd=self._epmd,
                start_timeout=start_timeout,
                **node_kwargs,
            )
            for i in range(size)
        ]
        self.version = self.nodes[0].version
        self.series = self.nodes[0].series

    def __repr__(self) -> str:
        running = sum(n.is_running() for n in self.nodes)
        return (
            f"<RabbitCluster of {len(self.nodes)} RabbitMQ {self.version}"
            f" nodes ({running} running) amqp ports {[n.amqp_port for n in self.nodes]}>"
        )

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, index: int) -> RabbitNode:
        return self.nodes[index]

    def __iter__(self) -> Iterator[RabbitNode]:
        return iter(self.nodes)

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def nodenames(self) -> list[str]:
        return sorted(n.nodename for n in self.nodes)

    def url(
        self, index: int, user: str = "guest", password: str = "guest", vhost: str = "/"
    ) -> str:
        """The ``amqp://`` URL of node ``index``."""
        return self.nodes[index].url(user, password, vhost)

    def urls(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> list[str]:
        """Every node's ``amqp://`` URL, in node order."""
        return [n.url(user, password, vhost) for n in self.nodes]

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> RabbitCluster:
        """Start every node (at once, in threads), join them to node 0, wait until all run."""
        deadline = _Deadline(timeout or self.start_timeout)
        try:
            with _live_lock:
                _live_nodes.add(self)
            self._watchdog.arm()
            self._epmd.start(deadline)
            self._in_parallel(lambda n: n.start(timeout=deadline.remaining(1)), self.nodes)
            seed = self.nodes[0]
            # One at a time: concurrent joins to one seed can trip over each other.
            for node in self.nodes[1:]:
                if node.nodename not in seed.running_nodes():
                    node.join_cluster(seed, timeout=deadline.remaining(1))
            self.wait_running(timeout=deadline.remaining(1))
        except BaseException:
            with contextlib.suppress(Exception):
                self._kill_everything()
            raise
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every node, then the cluster's epmd; leave no process behind. Idempotent."""
        deadline = _Deadline(timeout)
        errors: list[BaseException] = []
        # All at once: a cluster node stopping last waits for nobody.
        self._in_parallel(
            lambda n: n.stop(timeout=deadline.remaining(5)), self.nodes, errors=errors
        )
        self._kill_everything()
        if errors:
            raise errors[0]

    def _kill_everything(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node._kill_everything()
        _kill_marked(f"{self._tag}:")
        self._epmd.stop()
        self._watchdog.disarm()
        with _live_lock:
            _live_nodes.discard(self)

    def leftover_pids(self) -> list[int]:
        """Pids of live processes of any node or of the cluster's epmd."""
        pids = _pids_with_marker(f"{self._tag}:")
        for node in self.nodes:
            pids += node.leftover_pids()
        return sorted(pids)

    @staticmethod
    def _in_parallel(
        work: Callable[[RabbitNode], object],
        nodes: Sequence[RabbitNode],
        errors: list[BaseException] | None = None,
    ) -> None:
        """Run ``work`` on each node in its own thread; raise the first error (or collect)."""
        failed: list[BaseException] = [] if errors is None else errors

        def run(node: RabbitNode) -> None:
            try:
                work(node)
            except BaseException as e:
                failed.append(e)

        threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # every node method is bounded by its own timeout
        if failed and errors is None:
            raise failed[0]

    # -- one node at a time -----------------------------------------------------------------

    def stop_node(self, index: int, timeout: float = 30.0) -> None:
        """Stop node ``index`` gracefully (its data stays); the others go on."""
        self.nodes[index].stop(timeout=timeout)

    def start_node(self, index: int, timeout: float = 60.0) -> None:
        """Start node ``index`` again with its data; it rejoins the cluster by itself."""
        self.nodes[index].start(timeout=timeout)
        self.wait_running(timeout=timeout)

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index`` (a crash); :meth:`start_node` brings it back."""
        self.nodes[index].kill()

    def restart_app(self, index: int, timeout: float = 60.0) -> None:
        """``stop_app`` + ``start_app`` on node ``index``, then wait until all nodes run."""
        deadline = _Deadline(timeout)
        self.nodes[index].restart_app(timeout=deadline.remaining(1))
        self.wait_running(timeout=deadline.remaining(1))

    def rolling_restart(self, *, app_only: bool = True, timeout: float = 180.0) -> None:
        """Restart the nodes one after another, each only once the cluster is whole again.

        ``app_only`` restarts the RabbitMQ application (``stop_app``/``start_app``); otherwise
        each node's VM is stopped and started.
        """
        deadline = _Deadline(timeout)
        for i in range(len(self.nodes)):
            if app_only:
                self.restart_app(i, timeout=deadline.remaining(1))
            else:
                self.stop_node(i, timeout=deadline.remaining(1))
                self.start_node(i, timeout=deadline.remaining(1))

    # -- what the cluster says --------------------------------------------------------------

    def running_nodes(self) -> list[str]:
        """Cluster members running, as the first node that answers sees them."""
        last: Exception | None = None
        for node in self.nodes:
            if node.is_running():
                try:
                    return node.running_nodes()
                except RabbitNodeError as e:  # e.g. its app is stopped
                    last = e
        raise RabbitNodeError(f"no node of the cluster answers: {last}")

    def wait_running(self, count: int | None = None, timeout: float = 60.0) -> list[str]:
        """Wait until ``count`` (default: all) nodes run as seen by every running node."""
        want = len(self.nodes) if count is None else count
        deadline = _Deadline(timeout)
        seen: object = None
        while True:
            try:
                views = [n.running_nodes() for n in self.nodes if n.is_running()]
                seen = views
                if views and all(len(v) == want for v in views):
                    return views[0]
            except RabbitNodeError as e:
                seen = e
            if deadline.expired:
                raise RabbitNodeError(f"{want} running nodes not seen within {timeout} s: {seen}")
            time.sleep(0.2)

    def list_queues(self, vhost: str = "/") -> dict[str, ClusterQueue]:
        """Queue name -> type, leader and members, from the first node that answers."""
        last: Exception | None = None
        for node in self.nodes:
            if node.is_running():
                try:
                    return node.queue_placement(vhost)
                except RabbitNodeError as e:
                    last = e
        raise RabbitNodeError(f"no node of the cluster answers: {last}")


# -- command line ------------------------------------------------------------------------------


class _StopRequested(BaseException):
    """Raised by the signal handler while a node is starting."""


def _serve(args: argparse.Namespace) -> int:
    if not _port_is_free(args.port):
        print(f"rabbitmq.py: port {args.port} on 127.0.0.1 is already in use", file=sys.stderr)
        return 2
    base = Path(args.dir or f".tmp/rabbitmq-{args.port}")
    # A fixed node name keeps durable queues from one run to the next.
    node = RabbitNode(
        base, amqp_port=args.port, nodename=f"local-{args.port}", config=args.config or ()
    )
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if starting:
            raise _StopRequested

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    parent = os.getppid()
    try:
        node.start()
        starting = False
        print(
            f"RabbitMQ {node.nodename} listening on {node.url()} (data in {node.base_dir})",
            flush=True,
        )
        while not stop.wait(0.5):
            if os.getppid() != parent:
                print("rabbitmq.py: parent process died, stopping", file=sys.stderr)
                break
            if not node.is_running():
                print(f"rabbitmq.py: the node died\n{node._logs()}", file=sys.stderr)
                return 1
    except _StopRequested:
        pass
    except RabbitNodeError as e:
        print(f"rabbitmq.py: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        node.stop()
    return 0


def _watchdog(tag: str) -> int:
    """Wait for the owner to disarm us or die; if it dies, kill everything marked ``tag``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if sys.stdin.buffer.read().endswith(b"disarm\n"):
        return 0
    _kill_marked(f"{tag}:", wait=30)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rabbitmq.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a private node in the foreground until signalled")
    serve.add_argument("--port", type=int, default=5672, help="AMQP port on 127.0.0.1")
    serve.add_argument("--dir", help="data directory (default .tmp/rabbitmq-PORT)")
    serve.add_argument(
        "--config", action="append", metavar="LINE", help="extra rabbitmq.conf line (repeatable)"
    )
    watchdog = sub.add_parser("_watchdog")  # internal, see _Watchdog
    watchdog.add_argument("tag")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _watchdog(args.tag)


if __name__ == "__main__":
    sys.exit(main())
