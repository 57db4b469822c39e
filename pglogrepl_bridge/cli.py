"""``pglogrepl-bridge``: thin typer commands over the library, assembled into one app.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error. No traceback
unless --verbose, and never a password. Each command lives in its own module and registers
itself on ``cliapp.app`` when imported; importing this module registers them all. The console
script (``__main__.main``) imports only the command being run, because start-up time is part
of every run.
"""

from __future__ import annotations

from . import admincli, bridge, demo, replicate, tail  # noqa: F401 - commands register on import
from .cliapp import app

__all__ = ["app"]
