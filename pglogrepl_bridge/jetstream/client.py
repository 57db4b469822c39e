"""The NATS connection both sides use: reconnecting across node failures, bounded at start.

nats-py retries the first connection as often as later ones (forever, with
``max_reconnect_attempts=-1``); a command pointed at the wrong address must fail clearly
instead, so the first connection is bounded here and later ones are not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from pglogrepl_bridge.errors import ReplicationError

if TYPE_CHECKING:
    from nats.aio.client import Client

log = logging.getLogger(__name__)

#: seconds the first connection may take before the command gives up
CONNECT_WITHIN = 10


async def connect(servers: Sequence[str]) -> Client:
    """A client of whichever of ``servers`` answers; it reconnects on its own afterwards."""
    from nats.errors import Error as NatsError

    client: list[Client] = []

    async def on_error(exc: Exception) -> None:
        log.debug("NATS: %s", exc)

    async def on_disconnect() -> None:
        if client and not client[0].is_closed:
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnect() -> None:
        log.info("reconnected to NATS")

    try:
        dialing = _dial(servers, on_error, on_disconnect, on_reconnect)
        nc = await asyncio.wait_for(dialing, CONNECT_WITHIN)
        client.append(nc)
        return nc
    except (TimeoutError, NatsError, OSError) as exc:
        why = (
            f"no server answered within {CONNECT_WITHIN}s"
            if isinstance(exc, TimeoutError)
            else str(exc)
        )
        raise ReplicationError(
            f"cannot connect to NATS at {', '.join(servers)}: {why or type(exc).__name__}: "
            "start the servers, or fix --nats"
        ) from None


async def _dial(
    servers: Sequence[str],
    on_error: Callable[[Exception], Awaitable[None]],
    on_disconnect: Callable[[], Awaitable[None]],
    on_reconnect: Callable[[], Awaitable[None]],
) -> Client:
    import nats

    return await nats.connect(
        servers=list(servers),
        connect_timeout=2,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )


async def close(nc: Client) -> None:
    """Close, best effort: what mattered was acknowledged before."""
    try:
        await asyncio.wait_for(nc.close(), 5)
    except Exception as exc:
        log.debug("closing the NATS connection: %s", exc)
