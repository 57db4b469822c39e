"""The typer app, shared options and error handling of ``pglogrepl-bridge``.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error. No traceback
unless --verbose, and never a password.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres.stream import StreamOptions

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    name="pglogrepl-bridge",
    help="Consume PostgreSQL logical replication (pgoutput) and bridge it downstream.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@functools.cache
def err() -> Console:
    """The stderr console, made on first use: rich costs start-up time every run would pay."""
    from rich.console import Console

    return Console(stderr=True)


def summary(text: str) -> None:
    """A command's closing line, on stderr. Off a terminal it is written as it is: rich would
    wrap it at 80 columns, and importing rich.console for one line cost 43-66 ms at the end of
    every run of bridge, replicate and publish (benchmarks/RESULTS.md, seventeenth session)."""
    if sys.stderr.isatty():
        err().print(text, highlight=False)
    else:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def out() -> Console:
    """The stdout console for tables. Off a terminal (a pipe, a file, a test) rich would cut
    wide tables to 80 columns with ellipses: there the width is generous, so nothing is lost."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 400)


log = logging.getLogger("pglogrepl_bridge")
_state = {"verbose": False}


# -- common options --------------------------------------------------------------------------

Dsn = Annotated[
    str,
    typer.Option(
        "--dsn",
        envvar="PGLOGREPL_DSN",
        show_envvar=True,
        show_default=False,
        help="libpq connection string or URI; empty means the PG* environment variables.",
    ),
]
Slot = Annotated[str, typer.Option("--slot", help="Logical replication slot (pgoutput).")]
Publications = Annotated[
    list[str], typer.Option("--publication", "-p", help="Publication to stream (repeatable).")
]
CreateSlot = Annotated[
    bool, typer.Option("--create-slot", help="Create the slot first if it does not exist.")
]
Temporary = Annotated[
    bool, typer.Option("--temporary", help="With --create-slot: a slot dropped on exit.")
]
StartLsn = Annotated[
    str | None,
    typer.Option("--start-lsn", help="Resume from this durable position (X/Y), not the slot's."),
]
UntilLsn = Annotated[
    str | None,
    typer.Option(
        "--until-lsn",
        help="Stop after the first transaction whose commit end LSN is >= this (X/Y), "
        "once it is acknowledged, and exit 0.",
    ),
]
ProtoVersion = Annotated[
    int | None,
    typer.Option("--proto-version", min=1, max=4, help="pgoutput protocol; default: the highest."),
]
Binary = Annotated[bool, typer.Option("--binary/--no-binary", help="Binary value format (PG 14+).")]
Streaming = Annotated[
    bool | None,
    typer.Option(
        "--streaming/--no-streaming",
        show_default="on with proto_version 2+",
        help="Receive large transactions while in progress (bounded memory; spills to disk).",
    ),
]
WaitForServer = Annotated[
    float,
    typer.Option(
        "--wait-for-server",
        min=0,
        metavar="SECONDS",
        help="Keep trying a first connection that fails for this long (default: fail at once; "
        "a stream that was established is always retried).",
    ),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=1,
        max=65535,
        help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics.",
    ),
]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Log progress and show tracebacks on errors.")
]


def _version(value: bool) -> None:
    if value:
        from pglogrepl_bridge import __version__  # reads the installed metadata: startup time

        typer.echo(f"pglogrepl-bridge {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Consume PostgreSQL logical replication (pgoutput) and bridge it downstream."""


def setup_logging(verbose: bool) -> None:
    """Log to stderr (INFO with --verbose); progress lines always, for logs off a terminal."""
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
    )
    # long-running commands report progress as structured lines when not on a terminal
    logging.getLogger("pglogrepl_bridge.progress").setLevel(logging.INFO)


def fail(exc: BaseException) -> NoReturn:
    """One or two lines on stderr; exit 2 for configuration errors, 1 for the rest."""
    if _state["verbose"]:
        err().print_exception()
    message = str(exc).strip() or type(exc).__name__
    err().print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


@contextmanager
def handled() -> Iterator[None]:
    """Any exception in the block becomes one error line and the exit code (see ``fail``)."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:  # BridgeError and the unexpected alike: one message, no traceback
        fail(exc)


def parse_lsn(text: str | None, option: str) -> Lsn | None:
    """An ``X/Y`` option value as an Lsn, the option named in the error."""
    if text is None:
        return None
    try:
        return Lsn.parse(text)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from None


class Signals:
    """SIGINT/SIGTERM stop whatever streams are attached, cleanly (a final status update is
    sent). Library code never touches signal handlers: the commands install them here and
    hand ``attach`` to the runners, which call it with their stream before it starts."""

    def __init__(self) -> None:
        self._stops: list[Callable[[], None]] = []
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def attach(self, stream: Any) -> None:
        """Stop ``stream`` on SIGINT/SIGTERM (at once if one already arrived)."""
        self._stops.append(stream.stop)
        if self.received is not None:
            stream.stop()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the clean stop is stuck (stdout nobody reads, say)
            _exit_now(signum)
        self.received = signum
        for stop in self._stops:
            stop()

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)
            }
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)


def _exit_now(signum: int) -> NoReturn:
    """A second SIGINT/SIGTERM: exit at once (128 + the signal). Nothing is lost: the slot
    is only confirmed up to what was written and acknowledged, so the next run resumes
    there, as after ``kill -9``."""
    with contextlib.suppress(OSError):
        os.write(2, b"pglogrepl-bridge: a second signal during the stop: exiting at once\n")
    os._exit(128 + signum)


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGINT/SIGTERM call ``stop`` while the block runs (main thread only)."""

    class _One:
        def stop(self) -> None:
            stop()

    with Signals() as signals:
        signals.attach(_One())
        yield


def stream_options(
    slot: str,
    publications: list[str],
    *,
    create_slot: bool,
    temporary: bool,
    start_lsn: str | None,
    proto_version: int | None,
    binary: bool,
    streaming: bool | None,
    **extra: Any,
) -> StreamOptions:
    """StreamOptions from the options every streaming command shares, checked."""
    if temporary and not create_slot:
        raise ConfigError("--temporary only makes sense with --create-slot")
    if not publications:
        raise ConfigError("no publication given: add --publication NAME (repeatable)")
    start = parse_lsn(start_lsn, "--start-lsn")
    return StreamOptions(
        slot=slot,
        publications=tuple(publications),
        create_slot=create_slot,
        temporary=temporary,
        start_lsn=start,
        proto_version=proto_version,
        binary=binary,
        streaming=streaming,
        **extra,
    )


def report_problem(problem: object) -> None:
    """Log a value that kept its text because it could not be converted."""
    log.warning("value kept as text: %s", problem)
