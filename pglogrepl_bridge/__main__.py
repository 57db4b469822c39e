"""``python -m pglogrepl_bridge``."""

from .cli import main

main()
