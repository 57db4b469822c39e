"""The ``pglogrepl-bridge`` console script and ``python -m pglogrepl_bridge``.

Only the module of the command being run is imported: the full app pulls in SQLAlchemy, the
bridge and the demo, and start-up time counts in every short run and every benchmark.
"""

from __future__ import annotations

import gc
import importlib
import sys

# first argument -> the module that registers that command
_COMMAND_MODULES = {
    "tail": "tail",
    "replicate": "replicate",
    "bridge": "bridge",
    "demo": "demo",
    "slot": "admincli",
    "publication": "admincli",
    "status": "admincli",
}


def main() -> None:
    module = _COMMAND_MODULES.get(sys.argv[1] if len(sys.argv) > 1 else "")
    # anything else (no command, --help, --version, a typo) gets the full app and its listing
    importlib.import_module(f"{__package__}.{module}" if module else f"{__package__}.cli")
    from .cliapp import app

    try:
        app()
    finally:
        # Everything is flushed and closed by now. The interpreter's last garbage collection
        # would walk every object the imports made: 70-130 ms of each run, for nothing.
        gc.freeze()


if __name__ == "__main__":
    main()
