"""The ``pglogrepl-bridge`` command line: typer lives here and nowhere else.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error (``app.fail``). Each
command lives in its own module and registers itself on ``app.app`` when imported. ``main``
imports only the module of the command being run, because start-up time is part of every
run (the full app pulls in SQLAlchemy, the bridge and the demo); ``full_app`` imports them
all, for ``--help`` and for tests.
"""

from __future__ import annotations

import gc
import importlib
import sys
from typing import TYPE_CHECKING

from pglogrepl_bridge.cli.allocator import keep_freed_heap

if TYPE_CHECKING:
    import typer

#: first argument -> the module that registers that command (a new command goes here)
COMMAND_MODULES = {
    "tail": "tail",
    "replicate": "replicate",
    "bridge": "bridge",
    "publish": "publish",
    "replica": "replica",
    "demo": "demo",
    "slot": "admin",
    "publication": "admin",
    "status": "admin",
    "snapshot": "admin",
    "doctor": "doctor",
}


def full_app() -> typer.Typer:
    """The app with every command registered."""
    for module in sorted(set(COMMAND_MODULES.values())):
        importlib.import_module(f"{__name__}.{module}")
    from pglogrepl_bridge.cli.app import app

    return app


def main() -> None:
    """The console script: imports only what the command being run needs."""
    module = COMMAND_MODULES.get(sys.argv[1] if len(sys.argv) > 1 else "")
    if module is None:  # no command, --help, --version, a typo: the full listing
        app = full_app()
    else:
        importlib.import_module(f"{__name__}.{module}")
        from pglogrepl_bridge.cli.app import app
    # A stream makes a few tracked objects per row, most alive until their batch is written.
    # With CPython's default threshold (700) a collection ran every few hundred rows, and the
    # full ones walked every object the imports made: 0.2 s of CPU per 200,000 changes into
    # SQLite (benchmarks/RESULTS.md). The stream's objects are freed by reference counting;
    # a collection every 10,000 allocations costs a tenth of that.
    gc.set_threshold(10_000, 10, 10)
    keep_freed_heap()  # the heap's pages stay for the next transaction (cli.allocator)
    try:
        app()
    finally:
        # Everything is flushed and closed by now. The interpreter's last garbage collection
        # would walk every object the imports made: 70-130 ms of each run, for nothing.
        gc.freeze()


__all__ = ["COMMAND_MODULES", "full_app", "main"]
