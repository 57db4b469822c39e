"""``python -m pglogrepl_bridge``: the same as the ``pglogrepl-bridge`` console script."""

from pglogrepl_bridge.cli import main

if __name__ == "__main__":
    main()
