"""Progress of a running stream: a live status line on a terminal, structured log lines
elsewhere, and Prometheus metrics (``--metrics-port``) through ``prometheus_client``.

Read-only: a thread samples the stream's counters once a second; the hot path pays nothing.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

from pglogrepl_bridge.lsn import format_lsn
from pglogrepl_bridge.postgres.stream import _StreamBase

log = logging.getLogger("pglogrepl_bridge.progress")


class Metrics:
    """The Prometheus metrics served on ``127.0.0.1:port``: the stream's, and a snapshot's
    (``pglogrepl_snapshot_rows_total``, tables pending and done). One per run, shared by
    the snapshot and the stream that follows; ``close`` stops serving."""

    def __init__(self, port: int) -> None:
        # imported here: most runs serve no metrics, and every run pays for its imports
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Gauge(
            "pglogrepl_received_lsn", "Furthest WAL position received", registry=r
        )
        self.confirmed = Gauge(
            "pglogrepl_confirmed_lsn", "WAL position confirmed to the slot", registry=r
        )
        self.lag = Gauge(
            "pglogrepl_lag_bytes", "Server WAL end minus the confirmed position", registry=r
        )
        self.transactions = Counter("pglogrepl_transactions", "Transactions delivered", registry=r)
        self.changes = Counter("pglogrepl_changes", "Changes delivered", registry=r)
        self.reconnects = Counter("pglogrepl_reconnects", "Reconnections to PostgreSQL", registry=r)
        self.snapshot_rows = Counter(
            "pglogrepl_snapshot_rows", "Rows copied by snapshots", registry=r
        )
        self.snapshot_pending = Gauge(
            "pglogrepl_snapshot_tables_pending", "Tables the running snapshot has yet to copy",
            registry=r,
        )  # fmt: skip
        self.snapshot_done = Gauge(
            "pglogrepl_snapshot_tables_done", "Tables the running snapshot copied", registry=r
        )
        self.nats_published = Counter(
            "pglogrepl_nats_published", "Transactions JetStream acknowledged (publish)", registry=r
        )
        self.nats_pending = Gauge(
            "pglogrepl_nats_pending_acks", "Publishes awaiting JetStream's acknowledgement",
            registry=r,
        )  # fmt: skip
        self.nats_acked_lsn = Gauge(
            "pglogrepl_nats_acked_lsn", "End LSN of the last transaction JetStream acknowledged",
            registry=r,
        )  # fmt: skip
        self.nats_applied = Counter(
            "pglogrepl_nats_applied", "Transactions replicate --from-nats applied", registry=r
        )
        self.nats_applied_lsn = Gauge(
            "pglogrepl_nats_applied_lsn", "End LSN the target holds (replicate --from-nats)",
            registry=r,
        )  # fmt: skip
        self.group_term = Gauge(
            "pglogrepl_group_term", "The bridge group's current term, as this member knows it",
            registry=r,
        )  # fmt: skip
        self.group_role = Gauge(
            "pglogrepl_group_role", "This member's role: 0 standby, 1 candidate, 2 master",
            registry=r,
        )  # fmt: skip
        self.group_elections = Counter(
            "pglogrepl_group_elections", "Elections this member started", registry=r
        )
        self.server, self.thread = start_http_server(port, addr="127.0.0.1", registry=r)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


class Progress:
    """``with Progress(stream, live=..., metrics_port=...):`` around the consuming loop."""

    def __init__(
        self,
        stream: _StreamBase,  # a ReplicationStream or an AsyncReplicationStream
        *,
        live: bool | None = None,
        metrics_port: int | None = None,
        metrics: Metrics | None = None,
        log_every: float = 10.0,
        extra: Callable[[], str] | None = None,
    ) -> None:
        self.stream = stream
        #: what the command adds to the line (publish: published, pending, acknowledged)
        self.extra = extra
        self.live = sys.stderr.isatty() if live is None else live
        #: served by us (``metrics_port``) or by the caller (``metrics``, left open)
        self._own_metrics = metrics is None and metrics_port is not None
        self.metrics = Metrics(metrics_port) if self._own_metrics else metrics  # type: ignore[arg-type]
        self.log_every = log_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._seen = (0, 0, 0)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.metrics is not None and self._own_metrics:
            self.metrics.close()

    def snapshot(self) -> dict[str, int]:
        """The counters and positions shown and exported now."""
        s = self.stream
        feedback = s.feedback
        end = max(feedback.received, feedback.idle_end)
        return {
            "transactions": s.transactions,
            "changes": s.changes,
            "reconnects": s.reconnects,
            "received_lsn": feedback.received,
            "confirmed_lsn": feedback.flushed,
            "lag_bytes": max(0, end - feedback.flushed),
        }

    def _run(self) -> None:
        if self.live:  # rich only for a terminal: every run pays for its imports
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            live = Live(
                Text(""), console=Console(stderr=True), refresh_per_second=2, transient=True
            )
            live.start()
        last_log = time.monotonic()
        previous = self.snapshot()
        previous_at = time.monotonic()
        try:
            while not self._stop.wait(1.0):
                now = time.monotonic()
                snap = self.snapshot()
                elapsed = max(now - previous_at, 1e-9)
                rates = {k: (snap[k] - previous[k]) / elapsed for k in ("transactions", "changes")}
                self._export(snap)
                line = (
                    f"{rates['transactions']:,.0f} txn/s  {rates['changes']:,.0f} changes/s  "
                    f"lag {snap['lag_bytes']:,} bytes  last {format_lsn(snap['received_lsn'])}  "
                    f"confirmed {format_lsn(snap['confirmed_lsn'])}"
                )
                more = self.extra() if self.extra is not None else ""
                if more:
                    line += f"  {more}"
                if self.live:
                    live.update(Text(line, style="dim"))
                elif now - last_log >= self.log_every:
                    log.info(
                        "progress transactions=%d changes=%d txn_per_s=%.0f changes_per_s=%.0f "
                        "lag_bytes=%d received_lsn=%s confirmed_lsn=%s reconnects=%d%s",
                        snap["transactions"],
                        snap["changes"],
                        rates["transactions"],
                        rates["changes"],
                        snap["lag_bytes"],
                        format_lsn(snap["received_lsn"]),
                        format_lsn(snap["confirmed_lsn"]),
                        snap["reconnects"],
                        f" {more.replace(': ', '=')}" if more else "",
                    )
                    last_log = now
                previous, previous_at = snap, now
            self._export(self.snapshot())
        finally:
            if self.live:
                live.stop()

    def _export(self, snap: dict[str, int]) -> None:
        m = self.metrics
        if m is None:
            return
        m.received.set(snap["received_lsn"])
        m.confirmed.set(snap["confirmed_lsn"])
        m.lag.set(snap["lag_bytes"])
        seen_t, seen_c, seen_r = self._seen
        m.transactions.inc(snap["transactions"] - seen_t)
        m.changes.inc(snap["changes"] - seen_c)
        m.reconnects.inc(snap["reconnects"] - seen_r)
        self._seen = (snap["transactions"], snap["changes"], snap["reconnects"])
