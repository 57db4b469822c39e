"""Human-readable rendering of transactions for a terminal (``tail --format pretty``)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from pglogrepl_bridge.lsn import format_lsn
from pglogrepl_bridge.pgoutput.messages import Message
from pglogrepl_bridge.pgoutput.transaction import Change, RowChange, Transaction, TruncateChange

_OP_STYLE = {"insert": "bold green", "update": "bold yellow", "delete": "bold red"}
_MAX_VALUE = 60


def _value(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 1] + "…"


def _columns(values: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_value(v)}" for k, v in values.items())


def render_change(change: Change) -> Text:
    """One change as rich text for the terminal."""
    line = Text("  ")
    if isinstance(change, RowChange):
        line.append(f"{change.op.upper():<8}", style=_OP_STYLE[change.op])
        line.append(f"{change.schema}.{change.table}  ", style="cyan")
        new, old = change.new, change.old
        if (
            change.op == "update"
            and new is not None
            and old is not None
            and (change.old_kind == "O")
        ):
            changed = {k: v for k, v in new.items() if old.get(k) != v}
            line.append(
                _columns(old if not changed else {k: old.get(k) for k in changed}), style="dim"
            )
            line.append(" → ")
            line.append(_columns(changed))
        elif change.op == "delete":
            line.append(_columns(old or {}), style="dim")
        else:
            if old is not None:
                line.append(_columns(old) + " → ", style="dim")
            line.append(_columns(new or {}))
        if change.unchanged_toast:
            line.append(f"  (unchanged: {', '.join(change.unchanged_toast)})", style="dim")
    elif isinstance(change, TruncateChange):
        line.append("TRUNCATE ", style="bold magenta")
        line.append(", ".join(r.qualified_name for r in change.relations), style="cyan")
        if change.cascade:
            line.append(" CASCADE")
        if change.restart_identity:
            line.append(" RESTART IDENTITY")
    elif isinstance(change, Message):
        line.append("MESSAGE  ", style="bold blue")
        line.append(f"{change.prefix}: ", style="cyan")
        line.append(_value(change.content.decode(errors="replace")))
    return line


def print_transaction(console: Console, txn: Transaction, changes: list[Change]) -> None:
    """A transaction and its (filtered) changes on the console."""
    head = Text()
    head.append(f"xid {txn.xid}", style="bold")
    head.append(f"  {format_lsn(txn.end_lsn)}  {txn.commit_time.isoformat()}", style="dim")
    if txn.origin:
        head.append(f"  origin {txn.origin}", style="dim")
    if txn.gid:
        head.append(f"  prepared as {txn.gid!r}", style="dim")
    console.print(head)
    for change in changes:
        console.print(render_change(change))
