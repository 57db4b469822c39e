"""``doctor``: a preflight of a server for logical replication, each finding with its fix.

Operators otherwise set logical replication up by trial and error, and some mistakes only
show on the source: a published table without a primary key under ``REPLICA IDENTITY
DEFAULT`` makes its own UPDATEs and DELETEs fail. The checks read the catalog over an
ordinary connection; nothing is changed.

A finding is ``ok``, a ``warning`` (a risk worth knowing: the run goes on) or a ``problem``
(replication will fail or lose data until it is fixed). The CLI exits 1 when there is a
problem.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.postgres.connection import Conn

Status = Literal["ok", "warning", "problem"]

#: An inactive slot holding back more WAL than this is reported.
PINNED_WAL_WARNING = 1 << 30
#: Fewer free replication slots / WAL senders than this is a warning.
HEADROOM = 2


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's outcome: what was checked, what was found, and how to fix it."""

    check: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        """For ``--format json``."""
        return asdict(self)


def diagnose(
    conn: Conn,
    *,
    slot: str | None = None,
    publications: tuple[str, ...] = (),
    pinned_warning: int = PINNED_WAL_WARNING,
) -> list[Finding]:
    """Every check, in the order a reader fixes them: server, role, publications, slots.

    ``publications`` empty checks every publication of the database; other inactive slots
    holding back more than ``pinned_warning`` bytes of WAL are reported.
    """
    findings = [*_server(conn), _role(conn)]
    findings += _publications(conn, publications)
    findings += _slots(conn, slot, pinned_warning)
    return findings


def _setting(conn: Conn, name: str) -> str | None:
    row = conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()
    return None if row is None else str(row[0])


def _scalar(conn: Conn, query: str, *params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _server(conn: Conn) -> list[Finding]:
    out = []
    wal_level = _setting(conn, "wal_level")
    if wal_level == "logical":
        out.append(Finding("wal_level", "ok", "logical"))
    else:
        out.append(
            Finding(
                "wal_level",
                "problem",
                f"{wal_level}: logical decoding needs 'logical'",
                "ALTER SYSTEM SET wal_level = logical; then restart the server",
            )
        )
    used_slots = _scalar(conn, "SELECT count(*) FROM pg_replication_slots")
    out.append(
        _headroom("max_replication_slots", int(_setting(conn, "max_replication_slots") or 0),
                  int(used_slots), "slots")
    )  # fmt: skip
    senders = _scalar(conn, "SELECT count(*) FROM pg_stat_replication")
    out.append(
        _headroom("max_wal_senders", int(_setting(conn, "max_wal_senders") or 0),
                  int(senders), "WAL senders")
    )  # fmt: skip
    keep = _setting(conn, "max_slot_wal_keep_size")
    if keep in (None, "-1"):
        out.append(
            Finding(
                "max_slot_wal_keep_size",
                "warning",
                "unset (-1): a slot whose consumer stops keeps all WAL from then on, until the "
                "disk is full",
                "ALTER SYSTEM SET max_slot_wal_keep_size = '<size the disk can spare>'; "
                "SELECT pg_reload_conf()  (a slot past it is invalidated instead)",
            )
        )
    else:
        out.append(Finding("max_slot_wal_keep_size", "ok", f"{keep} MB"))
    idle = _setting(conn, "idle_replication_slot_timeout")  # PostgreSQL 18+
    if idle is not None:
        if idle in ("0", "0s", "0min"):
            out.append(Finding("idle_replication_slot_timeout", "ok", "0 (slots never expire)"))
        else:
            out.append(
                Finding(
                    "idle_replication_slot_timeout",
                    "warning",
                    f"{idle} s: a slot idle that long is invalidated at a checkpoint, and its "
                    "consumer must resynchronise",
                    "keep consumers running, or ALTER SYSTEM SET "
                    "idle_replication_slot_timeout = 0 (or longer than any planned outage)",
                )
            )
    return out


def _headroom(name: str, limit: int, used: int, what: str) -> Finding:
    free = limit - used
    detail = f"{used} of {limit} {what} in use"
    fix = f"ALTER SYSTEM SET {name} = {max(limit * 2, used + 10)}; then restart the server"
    if free <= 0:
        return Finding(name, "problem", detail + ": none left for a new consumer", fix)
    if free < HEADROOM:
        return Finding(name, "warning", detail + f": only {free} left", fix)
    return Finding(name, "ok", detail)


def _role(conn: Conn) -> Finding:
    row = conn.execute(
        "SELECT rolname, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row is not None
    name, replication, superuser = row
    if replication or superuser:
        return Finding(
            "role", "ok", f"{name} has REPLICATION" + (" (superuser)" if superuser else "")
        )
    # managed services grant replication through a role of their own
    managed = _scalar(
        conn,
        "SELECT string_agg(r.rolname, ', ') FROM pg_roles r "
        "WHERE r.rolname IN ('rds_replication', 'azure_pg_admin', 'cloudsqlsuperuser') "
        "AND pg_has_role(current_user, r.oid, 'member')",
    )
    if managed:
        return Finding("role", "ok", f"{name} is a member of {managed} (managed service)")
    return Finding(
        "role",
        "problem",
        f"{name} lacks the REPLICATION attribute: it cannot start a replication stream",
        f"ALTER ROLE {name} REPLICATION  (as a superuser; on RDS: GRANT rds_replication TO {name})",
    )


_IDENTITY = {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": "USING INDEX"}


def _publications(conn: Conn, names: tuple[str, ...]) -> list[Finding]:
    existing = {p.name: p for p in admin.list_publications(conn)}
    wanted = names or tuple(existing)
    if not wanted:
        return [
            Finding(
                "publications",
                "warning",
                "this database has no publication",
                "CREATE PUBLICATION <name> FOR TABLE ... (or pglogrepl-bridge publication create)",
            )
        ]
    out = []
    for name in wanted:
        pub = existing.get(name)
        if pub is None:
            out.append(
                Finding(
                    f"publication {name}",
                    "problem",
                    "does not exist in this database",
                    f"CREATE PUBLICATION {name} FOR TABLE ...  (or check the database)",
                )
            )
            continue
        scope = "all tables" if pub.all_tables else f"{len(pub.tables)} table(s)"
        out.append(
            Finding(
                f"publication {name}",
                "ok" if pub.tables or pub.all_tables else "warning",
                f"covers {scope}" + (f": {', '.join(pub.tables)}" if pub.tables else ""),
                "" if pub.tables else f"ALTER PUBLICATION {name} ADD TABLE ...",
            )
        )
        out += _identities(conn, name)
    return out


def _identities(conn: Conn, publication: str) -> list[Finding]:
    """Each published table's replica identity: without one, the source itself refuses
    UPDATE and DELETE on it (when the publication publishes them)."""
    rows = conn.execute(
        "SELECT t.schemaname, t.tablename, c.relreplident, "
        "EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), "
        "p.pubupdate OR p.pubdelete "
        "FROM pg_publication_tables t "
        "JOIN pg_publication p ON p.pubname = t.pubname "
        "JOIN pg_namespace n ON n.nspname = t.schemaname "
        "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename "
        "WHERE t.pubname = %s ORDER BY 1, 2",
        (publication,),
    ).fetchall()
    out = []
    for schema, table, ident, has_pk, updates in rows:
        qualified = f"{schema}.{table}"
        check = f"replica identity {qualified}"
        kind = str(_IDENTITY.get(ident, ident))
        if (ident == "d" and not has_pk) or ident == "n":
            why = "no primary key" if ident == "d" else "REPLICA IDENTITY NOTHING"
            out.append(
                Finding(
                    check,
                    "problem" if updates else "warning",
                    f"{kind} with {why}: "
                    + (
                        "UPDATE and DELETE on this table fail on the source"
                        if updates
                        else "only inserts are published, so nothing fails yet"
                    ),
                    f"ALTER TABLE {qualified} ADD PRIMARY KEY (...), or ALTER TABLE {qualified} "
                    "REPLICA IDENTITY FULL (every column is then sent as the old row)",
                )
            )
        else:
            detail = kind + (" (primary key)" if ident == "d" else "")
            out.append(Finding(check, "ok", detail))
    return out


def _slots(conn: Conn, name: str | None, pinned_warning: int) -> list[Finding]:
    slots = admin.list_slots(conn)
    database = _scalar(conn, "SELECT current_database()")
    out = []
    if name is not None:
        slot = next((s for s in slots if s.name == name), None)
        out.append(_slot(slot, name, database))
    for s in slots:
        if s.name == name or s.active or s.lag_bytes is None:
            continue
        if s.lag_bytes > pinned_warning:
            out.append(
                Finding(
                    f"inactive slot {s.name}",
                    "warning",
                    f"holds back {s.lag_bytes:,} bytes of WAL with no consumer",
                    f"resume its consumer, or SELECT pg_drop_replication_slot('{s.name}')",
                )
            )
    return out


def _slot(slot: admin.SlotInfo | None, name: str, database: str) -> Finding:
    check = f"slot {name}"
    if slot is None:
        return Finding(
            check,
            "problem",
            "does not exist",
            f"pglogrepl-bridge slot create {name}  (or --create-slot on the first run)",
        )
    if slot.slot_type != "logical" or slot.plugin != "pgoutput":
        return Finding(
            check,
            "problem",
            f"is a {slot.slot_type} slot with plugin {slot.plugin}, not pgoutput",
            "use another name, or drop it and create a pgoutput slot",
        )
    if slot.database != database:
        return Finding(
            check,
            "problem",
            f"belongs to database {slot.database}, not {database}",
            f"connect to {slot.database}, or create a slot in {database}",
        )
    reason = slot.invalidation_reason or ("wal removed" if slot.wal_status == "lost" else None)
    if reason is not None or slot.conflicting:
        return Finding(
            check,
            "problem",
            f"is invalidated ({reason or 'conflict with recovery'}): it can no longer stream",
            f"pglogrepl-bridge slot drop {name}; slot create {name}; resynchronise the consumer",
        )
    lag = "" if slot.lag_bytes is None else f", {slot.lag_bytes:,} bytes behind"
    state = f"{'active' if slot.active else 'inactive'}, wal_status {slot.wal_status}{lag}"
    if slot.safe_wal_size is not None:
        state += f", {slot.safe_wal_size:,} bytes until invalidation"
    if slot.wal_status == "unreserved":
        return Finding(
            check,
            "warning",
            state + ": past max_slot_wal_keep_size, invalidated at the next checkpoint",
            "resume its consumer now, or raise max_slot_wal_keep_size",
        )
    return Finding(check, "ok", state)
