"""`twistd consumer` options: parsing, precedence, and one clear line for each bad value."""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from pathlib import Path

import pytest
from support import CHECKOUT

from consumer_svc import ExitStatus
from consumer_svc._deadletters import add_arguments
from consumer_svc._options import BY_NAME, COMMAND_LINE, CONFIG, CONNECTION, markdown_table
from consumer_svc._settings import Settings
from consumer_svc._url import DEFAULT_URL, parse_url
from consumer_svc.tap import Options


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Options:
    options = Options(environ=environ or {})
    options.parseOptions(argv)
    return options


def refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str] | None = None
) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        parse(argv, environ)
    err = capsys.readouterr().err
    assert isinstance(exited.value.code, int)
    return exited.value.code, err


def test_defaults() -> None:
    """Only --queue is needed; everything else has a documented default."""
    s = parse(["--queue", "task_queue"]).settings
    assert (s.queue, s.prefetch, s.heartbeat, s.shutdown_timeout) == ("task_queue", 20, 30, 30.0)
    assert (s.concurrency, s.pause_after, s.pause_max, s.stall_check) == (10, 10, 300.0, 60.0)
    assert (s.url.host, s.url.port, s.url.vhost, s.url.username) == (
        "localhost",
        5672,
        "/",
        "guest",
    )
    assert s.declare
    assert s.handler is None
    assert s.queue_arguments == {}


def test_amqp_url_comes_from_the_environment() -> None:
    """Without --url, $AMQP_URL names the broker."""
    s = parse(["--queue", "q"], {"AMQP_URL": "amqp://u:p@rabbit.example:5673/jobs"}).settings
    assert (s.url.host, s.url.port, s.url.vhost, s.url.username) == (
        "rabbit.example",
        5673,
        "jobs",
        "u",
    )


def test_command_line_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    """Each source overrides the ones below it, key by key."""
    conf = tmp_path / "tap.conf"
    conf.write_text("[consumer]\nqueue = from_file\nprefetch = 7\nheartbeat = 11\nthreads = 3\n")
    s = parse(
        ["--config", str(conf), "--prefetch", "5"],
        {"CONSUMER_PREFETCH": "6", "CONSUMER_HEARTBEAT": "12"},
    ).settings
    assert (s.queue, s.prefetch, s.heartbeat, s.threads, s.shutdown_timeout) == (
        "from_file",
        5,
        12,
        3,
        30.0,
    )


def test_retry_options_and_the_dead_letter_queue_default() -> None:
    """--max-retries and --retry-delay are read; the dead-letter queue defaults to <queue>.dead."""
    s = parse(["--queue", "jobs", "--max-retries", "3", "--retry-delay", "0.5"]).settings
    assert (s.max_retries, s.retry_delay, s.dead_letter_queue) == (3, 0.5, "jobs.dead")
    assert (
        parse(["--queue", "jobs", "--dead-letter-queue", "parked"]).settings.dead_letter_queue
        == "parked"
    )


def test_repeatable_options_and_typed_queue_arguments() -> None:
    """--queue-arg values become the types RabbitMQ expects; --routing-key repeats."""
    s = parse(
        [
            "--queue", "q", "--queue-arg", "x-queue-type=quorum", "--queue-arg", "x-max-length=100",
            "--exchange", "ex", "--exchange-type", "topic", "--routing-key", "a.*", "--routing-key", "b.#",
        ]
    ).settings  # fmt: skip
    assert s.queue_arguments == {"x-queue-type": "quorum", "x-max-length": 100}
    assert (s.exchange, s.exchange_type, s.routing_keys) == ("ex", "topic", ("a.*", "b.#"))


def test_reply_to_allow_repeats_and_comes_from_the_environment() -> None:
    """--reply-to-allow repeats; CONSUMER_REPLY_TO_ALLOW takes a comma-separated list; none by default."""
    assert parse(["--queue", "q"]).settings.reply_to_allow == ()
    s = parse(["--queue", "q", "--reply-to-allow", "rpc.*", "--reply-to-allow", "replies"]).settings
    assert s.reply_to_allow == ("rpc.*", "replies")
    s = parse(["--queue", "q"], {"CONSUMER_REPLY_TO_ALLOW": "rpc.*, replies"}).settings
    assert s.reply_to_allow == ("rpc.*", "replies")


def test_lists_in_the_config_file(tmp_path: Path) -> None:
    """In the file, repeatable options take several lines or commas."""
    conf = tmp_path / "c.conf"
    conf.write_text(
        "[consumer]\nqueue = q\nexchange = ex\nrouting-key = a,\n  b\nno_declare = false\n"
    )
    s = parse(["--config", str(conf)]).settings
    assert s.routing_keys == ("a", "b")


def test_no_declare_from_flag_and_environment() -> None:
    """--no-declare, or CONSUMER_NO_DECLARE=1, only checks the queue exists."""
    assert parse(["--queue", "q", "--no-declare"]).settings.declare is False
    assert parse(["--queue", "q"], {"CONSUMER_NO_DECLARE": "1"}).settings.declare is False


def test_the_handler_is_imported_when_options_are_parsed() -> None:
    """--handler module:function resolves to the function itself."""
    import json

    # Any callable will do as the handler's signature goes: the option only imports it.
    loads: object = parse(["--queue", "q", "--handler", "json:loads"]).handler
    dumps: object = parse(["--queue", "q", "--handler", "json.dumps"]).handler
    assert loads is json.loads
    assert dumps is json.dumps


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (["--queue", "q", "--prefetch", "-3"], ExitStatus.CONFIG, "--prefetch must be a whole number from 1 to 65535, got '-3'"),
        (["--queue", "q", "--prefetch", "ten"], ExitStatus.CONFIG, "--prefetch must be a whole number"),
        (["--queue", "q", "--heartbeat", "1.5"], ExitStatus.CONFIG, "--heartbeat must be a whole number"),
        (["--queue", "q", "--shutdown-timeout", "nan"], ExitStatus.CONFIG, "--shutdown-timeout must be a number of seconds"),
        (["--queue", "q", "--url", "http://h/"], ExitStatus.CONFIG, "--url must start with amqp:// or amqps://"),
        (["--queue", "q", "--url", "amqp://u:pw@h:notaport/"], ExitStatus.CONFIG, "--url is not a valid AMQP URL"),
        ([], ExitStatus.CONFIG, "no queue given"),
        (["--queue", "q", "--config", "/nonexistent/tap.conf"], ExitStatus.CONFIG, "cannot read config file '/nonexistent/tap.conf'"),
        (["--queue", "q", "--queue-arg", "novalue"], ExitStatus.CONFIG, "--queue-arg takes KEY=VALUE"),
        (["--queue", "q", "--reply-to-allow", " "], ExitStatus.CONFIG, "--reply-to-allow must not be empty"),
        (["--queue", "q", "--routing-key", "k"], ExitStatus.CONFIG, "--routing-key needs --exchange"),
        (["--queue", "q", "--exchange", "e", "--exchange-type", "bogus"], ExitStatus.CONFIG, "--exchange-type must be one of"),
        (["--queue", "q", "--bogus"], ExitStatus.CONFIG, "option --bogus not recognized"),
        (["--queue", "q", "--tls-ca", "/nonexistent/ca.pem"], ExitStatus.CONFIG, "--tls-ca '/nonexistent/ca.pem' cannot be read"),
        (["--queue", "q", "--tls-cert", "/etc/hostname"], ExitStatus.CONFIG, "--tls-cert and --tls-key go together"),
        (["--queue", "q", "--health-port", "70000"], ExitStatus.CONFIG, "--health-port must be a whole number from 1 to 65535"),
        (["--queue", "q", "--max-retries", "-1"], ExitStatus.CONFIG, "--max-retries must be a whole number from 0 to 1000"),
        (["--queue", "q", "--dead-letter-queue", "q"], ExitStatus.CONFIG, "--dead-letter-queue must not be the queue itself"),
        (["--queue", "q", "--handler-timeout", "0"], ExitStatus.CONFIG, "--handler-timeout must be a number of seconds"),
        (["--queue", "q", "--handler", "no_such_module_xyz:handle"], ExitStatus.HANDLER, "cannot import handler module 'no_such_module_xyz'"),
        (["--queue", "q", "--handler", "json:no_such_function"], ExitStatus.HANDLER, "module 'json' has no attribute 'no_such_function'"),
        (["--queue", "q", "--handler", "json:__doc__"], ExitStatus.HANDLER, "is a str, not a callable"),
        (["--queue", "q", "--handler", "pkgutil:walk_packages"], ExitStatus.HANDLER, "--handler 'pkgutil:walk_packages' is a generator function"),
        (["--queue", "q", "--handler", "justaname"], ExitStatus.HANDLER, "is not of the form package.module:function"),
    ],
)  # fmt: skip
def test_bad_values_give_one_line_and_an_exit_status(
    capsys: pytest.CaptureFixture[str], argv: list[str], status: ExitStatus, says: str
) -> None:
    """Each bad value is named in a single line on stderr, with its documented exit status."""
    code, err = refused(capsys, argv)
    assert code == status
    assert err.count("\n") == 1
    assert err.startswith("twistd consumer: error: ")
    assert says in err


def test_bad_config_file_keys_and_values_are_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An unknown key, a missing section or a bad value in the file is named with the file."""
    conf = tmp_path / "tap.conf"
    conf.write_text("[consumer]\nqueue = q\nprefech = 3\n")
    assert "unknown key 'prefech'" in refused(capsys, ["--config", str(conf)])[1]
    conf.write_text("[other]\nqueue = q\n")
    assert "has no [consumer] section" in refused(capsys, ["--config", str(conf)])[1]
    conf.write_text("[consumer]\nqueue = q\nprefetch = 0\n")
    assert "--prefetch must be a whole number from 1" in refused(capsys, ["--config", str(conf)])[1]


def test_a_password_never_appears_in_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad URL is quoted with its password masked."""
    code, err = refused(capsys, ["--queue", "q", "--url", "amqpx://user:s3cret@host/"])
    assert code == ExitStatus.CONFIG
    assert "s3cret" not in err
    assert "user:***@host" in err


def test_the_shipped_tap_conf_works_as_is() -> None:
    """tap.conf in the repository parses and names a queue on the local broker (its example handler found with --handler-path)."""
    root = CHECKOUT
    s = parse(["--config", str(root / "tap.conf"), "--handler-path", str(root)]).settings
    assert s.queue == "task_queue"
    assert s.url.host in ("localhost", "127.0.0.1")


def test_several_urls_make_a_cluster(tmp_path: Path) -> None:
    """--url repeats; --url-file reads one per line, so no password shows in ps."""
    s = parse(["--queue", "q", "--url", "amqp://a/", "--url", "amqp://b:5673/"]).settings
    assert [(u.host, u.port) for u in s.urls] == [("a", 5672), ("b", 5673)]
    assert s.url == s.urls[0]
    secret = tmp_path / "broker.url"
    secret.write_text("# the cluster\namqp://svc:s3cret@n1/\namqp://svc:s3cret@n2/\n")
    s = parse(["--queue", "q", "--url-file", str(secret)], {"AMQP_URL": "amqp://ignored/"}).settings
    assert [u.host for u in s.urls] == ["n1", "n2"]
    assert s.url.password == "s3cret"


def test_url_and_url_file_together_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Two sources for the broker on the command line is a mistake, said so."""
    secret = tmp_path / "broker.url"
    secret.write_text("amqp://n1/\n")
    assert (
        "give --url or --url-file, not both"
        in refused(capsys, ["--queue", "q", "--url", "amqp://a/", "--url-file", str(secret)])[1]
    )
    assert (
        "cannot read --url-file"
        in refused(capsys, ["--queue", "q", "--url-file", str(tmp_path / "none")])[1]
    )


def test_prefetch_defaults_to_twice_the_concurrency() -> None:
    """The next message is there when a handler finishes; an explicit prefetch stands."""
    assert parse(["--queue", "q", "--concurrency", "50"]).settings.prefetch == 100
    assert parse(["--queue", "q", "--concurrency", "40000"]).settings.prefetch == 65535
    assert parse(["--queue", "q", "--concurrency", "5", "--prefetch", "7"]).settings.prefetch == 7


def test_a_password_with_a_raw_at_sign_is_masked_whole_in_start_up_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad URL whose password holds a raw "@" is quoted with all of the password masked."""
    code, err = refused(capsys, ["--queue", "q", "--url", "amqpx://user:p@ss-w0rd@host/"])
    assert code == ExitStatus.CONFIG
    assert "ss-w0rd" not in err
    assert "user:***@host" in err


# -- errors that name their cause, file and line


def write_module(directory: Path, source: str) -> str:
    """A handler module with a name no other test uses; returns that name."""
    name = f"handler_mod_{secrets.token_hex(4)}"
    (directory / f"{name}.py").write_text(source)
    return name


def test_an_error_raised_while_importing_the_handler_names_its_file_and_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A KeyError from a missing environment variable at import time names the module's file and line."""
    name = write_module(tmp_path, 'import os\n\nDB_URL = os.environ["MYAPP_DB_URL_X1"]\n')
    argv = ["--queue", "q", "--handler-path", str(tmp_path), "--handler", f"{name}:handle"]
    code, err = refused(capsys, argv)
    assert code == ExitStatus.HANDLER
    assert err.count("\n") == 1
    assert f"KeyError: 'MYAPP_DB_URL_X1' ({tmp_path / name}.py, line 3)" in err


def test_a_syntax_error_in_the_handler_names_its_file_and_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A handler module that does not compile is one line naming the file and line."""
    name = write_module(tmp_path, "x = 1\ndef handle(:\n    pass\n")
    argv = ["--queue", "q", "--handler-path", str(tmp_path), "--handler", f"{name}:handle"]
    code, err = refused(capsys, argv)
    assert code == ExitStatus.HANDLER
    assert err.count("\n") == 1
    assert "SyntaxError" in err
    assert f"({tmp_path / name}.py, line 2)" in err


def test_the_current_directory_is_searched_only_when_asked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module planted in the current directory does not run; with --handler-path . it is the handler."""
    marker = tmp_path / "ran"
    name = write_module(tmp_path, f"open({str(marker)!r}, 'w').close()\ndef handle(m): pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    code, err = refused(capsys, ["--queue", "q", "--handler", f"{name}:handle"])
    assert code == ExitStatus.HANDLER
    assert f"No module named '{name}'" in err
    assert not marker.exists()
    options = parse(["--queue", "q", "--handler-path", ".", "--handler", f"{name}:handle"])
    assert options.handler.__module__ == name
    assert marker.exists()


def test_handler_path_must_name_directories(capsys: pytest.CaptureFixture[str]) -> None:
    """--handler-path with something that is not a directory is refused with exit 64."""
    code, err = refused(capsys, ["--queue", "q", "--handler-path", "/nonexistent-dir"])
    assert code == ExitStatus.CONFIG
    assert "--handler-path '/nonexistent-dir' is not a directory" in err


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[consumer]\nqueue = q\ngarbage\n", "line 3: 'garbage' is neither KEY = VALUE nor a [section] header"),
        ("queue = q\n[consumer]\n", "line 1: 'queue = q' comes before any [section] header"),
        ("[consumer]\nqueue = q\nqueue = r\n", "line 3: 'queue' is set twice in [consumer]"),
        ("[consumer]\nqueue = q\n[consumer]\n", "line 3: section [consumer] appears twice"),
    ],
)  # fmt: skip
def test_an_ini_syntax_error_names_its_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, says: str
) -> None:
    """A config file that is not valid INI is one line naming the file and the line at fault."""
    conf = tmp_path / "tap.conf"
    conf.write_text(text)
    code, err = refused(capsys, ["--config", str(conf)])
    assert code == ExitStatus.CONFIG
    assert err.count("\n") == 1
    assert f"config file '{conf}' is not valid INI: {says}" in err


def test_help_says_a_timed_out_message_is_retried() -> None:
    """--help describes --handler-timeout as a retry, which is what happens, not a requeue."""
    usage = " ".join(str(Options(environ={})).split())
    assert "before it is cancelled; its message is then retried (a failed attempt)" in usage
    assert "requeued" not in usage


# -- one description of each option: the table in consumer_svc/_options.py


def rows_by_option(table: str) -> dict[str, str]:
    """The rows of a Markdown options table, each by the name of its option."""
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    return {row.split("`--", 1)[1].split("`")[0].split()[0]: row for row in rows}


def test_readme_holds_the_options_table() -> None:
    """README.md's options table has every option, with the table's default, environment variables and help."""
    readme = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    expected = rows_by_option(markdown_table())

    rows = rows_by_option(section)

    differing = "\n".join(row for name, row in expected.items() if rows.get(name) != row)
    assert rows == expected, f"README.md's options table should have these rows:\n{differing}"
    assert list(rows) == [option.name for option in COMMAND_LINE]


def test_help_lists_every_option_with_its_help() -> None:
    """`twistd consumer --help` names each option of the table with its help text and default."""
    usage = " ".join(Options(environ={}).getUsage(width=10_000).split())

    for option in COMMAND_LINE:
        assert f"--{option.name}" in usage
        assert " ".join(option.usage.split()) in usage
    assert "[default: 30]" in BY_NAME["heartbeat"].usage
    assert "`" not in usage


def test_the_dead_letters_tool_describes_its_options_as_the_service_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`dead-letters --help` takes --config and the connection options, with the table's help."""
    monkeypatch.setenv("COLUMNS", "10000")
    tool = argparse.ArgumentParser()
    add_arguments(tool)

    usage = " ".join(tool.format_help().split())

    for option in (CONFIG, *CONNECTION):
        assert f"--{option.name}" in usage
        assert " ".join(option.usage.split()) in usage


def test_the_shipped_tap_conf_sets_options_to_their_defaults() -> None:
    """Each key of tap.conf (commented out or not) is an option, and each value it sets is the default but the queue."""
    conf = (CHECKOUT / "tap.conf").read_text(encoding="utf-8")
    keys = re.findall(r"^#? ?([a-z][a-z-]*) = (.*)$", conf, flags=re.MULTILINE)
    set_here = re.findall(r"^([a-z][a-z-]*) = (.*)$", conf, flags=re.MULTILINE)

    assert {key for key, _ in keys} <= set(BY_NAME)
    assert "queue" in dict(set_here)
    assert {key: value for key, value in set_here if key != "queue"} == {
        key: BY_NAME[key].default for key, _ in set_here if key != "queue"
    }


def test_settings_made_in_code_have_the_defaults_of_the_command_line() -> None:
    """`Settings(url, queue)` equals what `--queue q` alone resolves to: one set of defaults."""
    assert parse(["--queue", "q"]).settings == Settings(url=parse_url(DEFAULT_URL), queue="q")


def test_url_takes_commas_as_the_environment_does() -> None:
    """--url a,b names two brokers, as CONSUMER_URL=a,b does; an empty one is refused."""
    from_flag = parse(["--queue", "q", "--url", "amqp://a/,amqp://b/"]).settings.urls
    from_env = parse(["--queue", "q"], {"CONSUMER_URL": "amqp://a/,amqp://b/"}).settings.urls

    assert [url.host for url in from_flag] == [url.host for url in from_env] == ["a", "b"]
    with pytest.raises(SystemExit):
        parse(["--queue", "q", "--url", ","])
