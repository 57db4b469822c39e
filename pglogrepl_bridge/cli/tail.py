"""``tail``: print a publication's changes as they commit (pretty, JSON Lines, or nothing)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from pglogrepl_bridge.cli.app import (
    Binary,
    CreateSlot,
    Dsn,
    MetricsPort,
    ProtoVersion,
    Publications,
    Slot,
    StartLsn,
    Streaming,
    Temporary,
    UntilLsn,
    Verbose,
    WaitForServer,
    app,
    handled,
    parse_lsn,
    report_problem,
    setup_logging,
    stop_on_signals,
    stream_options,
)
from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput.relcache import RelationInfo
from pglogrepl_bridge.pgoutput.transaction import Change, RowChange, Transaction, TruncateChange
from pglogrepl_bridge.postgres.stream import ReplicationStream, StreamOptions
from pglogrepl_bridge.progress import Progress
from pglogrepl_bridge.render.jsonl import JsonRenderer

if TYPE_CHECKING:  # the snapshot's modules load only when --snapshot asks (start-up time)
    from pglogrepl_bridge.snapshot.plan import ChunkDone


class Format(StrEnum):
    """How ``tail`` prints transactions."""

    pretty = "pretty"
    jsonl = "jsonl"
    null = "null"


class Values(StrEnum):
    """Typed values, or PostgreSQL's own text."""

    typed = "typed"
    text = "text"


class Op(StrEnum):
    """The change kinds ``--op`` filters on."""

    insert = "insert"
    update = "update"
    delete = "delete"
    truncate = "truncate"
    message = "message"
    read = "read"  # a row of --snapshot


def change_filter(tables: list[str], ops: list[Op]) -> Callable[[Change], bool] | None:
    """The predicate for --table/--op (None: keep everything)."""
    if not tables and not ops:
        return None
    wanted_tables = {t if "." in t else f"public.{t}" for t in tables}
    wanted_ops = {o.value for o in ops}

    def keep(change: Change) -> bool:
        op: str
        names: set[str]
        if isinstance(change, RowChange):
            op, names = change.op, {change.relation.qualified_name}
        elif isinstance(change, TruncateChange):
            op, names = "truncate", {r.qualified_name for r in change.relations}
        else:
            op, names = "message", set()
        if wanted_ops and op not in wanted_ops:
            return False
        return not wanted_tables or op == "message" or bool(names & wanted_tables)

    return keep


@app.command()
def tail(
    slot: Slot,
    publication: Publications,
    dsn: Dsn = "",
    create_slot: CreateSlot = False,
    temporary: Temporary = False,
    start_lsn: StartLsn = None,
    until_lsn: UntilLsn = None,
    proto_version: ProtoVersion = None,
    binary: Binary = False,
    streaming: Streaming = None,
    wait_for_server: WaitForServer = 0.0,
    fmt: Annotated[
        Format | None,
        typer.Option(
            "--format",
            help="pretty (default on a terminal), jsonl (default otherwise) "
            "or null (decode and convert every value, then discard).",
        ),
    ] = None,
    values: Annotated[
        Values, typer.Option("--values", help="typed: JSON types; text: PostgreSQL's text.")
    ] = Values.typed,
    no_ack: Annotated[
        bool, typer.Option("--no-ack", help="Peek: confirm nothing to the slot.")
    ] = False,
    table: Annotated[
        list[str], typer.Option("--table", help="Only changes to schema.name (repeatable).")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    op: Annotated[list[Op], typer.Option("--op", help="Only these operations (repeatable).")] = [],  # noqa: B006
    messages: Annotated[
        bool, typer.Option("--messages/--no-messages", help="Include logical decoding messages.")
    ] = True,
    snapshot: Annotated[
        bool,
        typer.Option(
            "--snapshot",
            help="First print the rows that exist (op read), consistent with the stream "
            "that follows.",
        ),
    ] = False,
    metrics_port: MetricsPort = None,
    verbose: Verbose = False,
) -> None:
    """Print the changes of a publication as they commit."""
    setup_logging(verbose)
    with handled():
        if values is Values.text and binary:
            raise ConfigError("--values text needs the text format: drop --binary")
        if snapshot and start_lsn is not None:
            raise ConfigError("--snapshot starts where the copy ends: drop --start-lsn")
        until = parse_lsn(until_lsn, "--until-lsn")
        options = stream_options(
            slot,
            publication,
            create_slot=create_slot,
            temporary=temporary,
            start_lsn=start_lsn,
            proto_version=proto_version,
            binary=binary,
            streaming=streaming,
            wait_for_server=wait_for_server,
            no_ack=no_ack,
            values=values.value,
            messages=messages,
        )
        out_format = fmt or (Format.pretty if sys.stdout.isatty() else Format.jsonl)
        keep = change_filter(table, op)
        if snapshot:
            after = print_snapshot(dsn, options, out_format, values.value, table, op)
            if after is None:
                return  # stopped during the copy
            if until is not None and after.start_lsn is not None and after.start_lsn >= until:
                return
            options = after
        run_tail(dsn, options, out_format, values.value, keep, until, metrics_port)


def _pretty_printer() -> Callable[[Transaction, list[Change]], None]:
    """rich is imported for the pretty format only: every other run would pay for it."""
    from rich.console import Console

    from pglogrepl_bridge.render.pretty import print_transaction

    console = Console(highlight=False, soft_wrap=True)
    return lambda txn, changes: print_transaction(console, txn, changes)


def print_snapshot(
    dsn: str,
    options: StreamOptions,
    out_format: Format,
    values: str,
    tables: list[str],
    ops: list[Op],
) -> StreamOptions | None:
    """Print the rows that exist, as ``read`` changes in lines of up to 1000 rows of one
    table; returns the options to stream on from the snapshot's anchor (None if stopped)."""
    from pglogrepl_bridge.snapshot.readrows import ReadRows
    from pglogrepl_bridge.snapshot.runner import SnapshotJob

    wanted = {t if "." in t else f"public.{t}" for t in tables}
    if ops and Op.read not in ops:
        wanted = {"-"}  # no table matches: rows are read (the anchor is needed) but not shown
    renderer = JsonRenderer(values)  # type: ignore[arg-type]
    console = None
    if out_format is Format.pretty:
        from rich.console import Console

        console = Console(highlight=False, soft_wrap=True)

    def on_rows(rel: RelationInfo, chunk: ChunkDone, rows: list[bytes]) -> None:
        if wanted and rel.qualified_name not in wanted:
            return
        if out_format is Format.null:
            for raw in rows:
                rel.row_at(raw, 0)
            return
        head = (
            f'{{"op":"read","schema":{json.dumps(rel.namespace)},'
            f'"table":{json.dumps(rel.name)},"new":'
        )
        if console is not None:
            for raw in rows:
                console.print(
                    f"[dim]snapshot[/] read {rel.qualified_name} {renderer.row(rel, raw, 0)}",
                    markup=True,
                )
            return
        lsn = format_lsn(Lsn(chunk.anchor))
        changes = ",".join(head + renderer.row(rel, raw, 0) + "}" for raw in rows)
        line = (
            f'{{"snapshot":true,"lsn":"{lsn}","end_lsn":"{lsn}",'
            f'"table":{json.dumps(rel.qualified_name)},"changes":[{changes}]}}\n'
        )
        sys.stdout.buffer.write(line.encode())  # UTF-8, as the stream's lines
        sys.stdout.buffer.flush()

    job = SnapshotJob(dsn, ReadRows(on_rows), options, advance_slot=False)
    with stop_on_signals(job.stop):
        stats = job.run()
    if not stats.complete or stats.checkpoint is None:
        return None
    return replace(options, start_lsn=stats.checkpoint, create_slot=False)


def run_tail(
    dsn: str,
    options: StreamOptions,
    out_format: Format,
    values: str,
    keep: Callable[[Change], bool] | None,
    until: Lsn | None,
    metrics_port: int | None = None,
) -> int:
    """The tail loop; returns how many transactions were printed."""
    renderer = JsonRenderer(values)  # type: ignore[arg-type]
    show = _pretty_printer() if out_format is Format.pretty else None
    # JSON Lines are UTF-8: written as the renderer's bytes, not through a str (whatever
    # encoding stdout's text layer has)
    sys.stdout.flush()
    write = sys.stdout.buffer.write
    flush = sys.stdout.buffer.flush
    printed = 0
    if until is not None:
        options = replace(options, until_lsn=until)
    stream = ReplicationStream(dsn, options, on_problem=report_problem)
    live = out_format is Format.null and sys.stderr.isatty()
    with (
        stream,
        stop_on_signals(stream.stop),
        Progress(stream, live=live, metrics_port=metrics_port),
    ):
        txn: Transaction
        for txn in stream:
            if out_format is Format.null:
                for change in txn.changes:
                    if type(change) is RowChange:
                        _ = change.new, change.old  # every value converted, then discarded
                printed += 1
            elif out_format is Format.jsonl:
                changes = txn.changes if keep is None else [c for c in txn.changes if keep(c)]
                if keep is None or changes:
                    write(renderer.line(txn, renderer.changes_utf8(changes)))
                    write(b"\n")
                    flush()
                    printed += 1
            elif show is not None:  # pretty
                changes = list(txn.changes if keep is None else filter(keep, txn.changes))
                if keep is None or changes:
                    show(txn, changes)
                    printed += 1
            stream.ack(txn.end_lsn)
    return printed
