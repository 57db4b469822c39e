"""``pglogrepl-bridge doctor``: the preflight of ``postgres.doctor`` as a table or JSON."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer

from pglogrepl_bridge.cli.app import Dsn, Verbose, app, handled, out, setup_logging
from pglogrepl_bridge.postgres.connection import connect
from pglogrepl_bridge.postgres.doctor import Finding, diagnose


class DoctorFormat(StrEnum):
    """How ``doctor`` reports."""

    pretty = "pretty"
    json = "json"


_STYLE = {"ok": "green", "warning": "yellow", "problem": "bold red"}


@app.command()
def doctor(
    dsn: Dsn = "",
    slot: Annotated[str | None, typer.Option("--slot", help="Also check this slot.")] = None,
    publication: Annotated[
        list[str],
        typer.Option("--publication", "-p", help="Check these publications (default: all)."),
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    out_format: Annotated[
        DoctorFormat, typer.Option("--format", help="pretty (a table) or json (for scripts).")
    ] = DoctorFormat.pretty,
    verbose: Verbose = False,
) -> None:
    """Check a server for logical replication: settings, role, publications, replica
    identities, slots. Each finding comes with its fix; exit 1 when there is a problem."""
    setup_logging(verbose)
    with handled(), connect(dsn, replication=False) as conn:
        findings = diagnose(conn, slot=slot, publications=tuple(publication))
    problems = sum(f.status == "problem" for f in findings)
    if out_format is DoctorFormat.json:
        report = {"ok": not problems, "findings": [f.as_dict() for f in findings]}
        typer.echo(json.dumps(report, indent=1))
    else:
        _print(findings)
    raise typer.Exit(1 if problems else 0)


def _print(findings: list[Finding]) -> None:
    from rich.table import Table

    table = Table("check", "status", "finding", "fix", show_lines=False)
    for f in findings:
        table.add_row(f.check, f"[{_STYLE[f.status]}]{f.status}[/]", f.detail, f.fix)
    console = out()
    console.print(table)
    problems = sum(f.status == "problem" for f in findings)
    warnings = sum(f.status == "warning" for f in findings)
    if problems:
        console.print(f"[bold red]{problems} problem(s)[/], {warnings} warning(s)")
    elif warnings:
        console.print(f"[green]no problems[/], [yellow]{warnings} warning(s)[/]")
    else:
        console.print("[green]all clear[/]")
