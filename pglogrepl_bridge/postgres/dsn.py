"""DSN handling: the one place that turns a connection string into something safe to print."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from pglogrepl_bridge.errors import ConfigError

_SHOWN = ("host", "hostaddr", "port", "dbname", "user")


def redact_dsn(dsn: str) -> str:
    """Host, port, database and user only: never the password or other secrets."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparsable connection string>"
    shown = [f"{k}={params[k]}" for k in _SHOWN if params.get(k) not in (None, "")]
    return " ".join(shown) or "<libpq defaults>"


def validate_dsn(dsn: str) -> dict[str, str | int | None]:
    """Parse the DSN early, so a typo is a configuration error and not a connection failure."""
    try:
        return conninfo_to_dict(dsn)
    except Exception as exc:
        # psycopg's message may quote the string; keep only the reason's first line.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "password" in reason.lower():
            reason = "syntax error"
        raise ConfigError(
            f"invalid connection string ({reason}): use 'key=value' pairs "
            "(host=... dbname=...) or a postgresql:// URI"
        ) from None
