"""Only the optional C accelerator; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional: without a C compiler the package installs and runs as pure Python
        Extension(
            "pglogrepl_bridge.pgoutput._fastrow",
            ["pglogrepl_bridge/pgoutput/_fastrow.c"],
            optional=True,
        )
    ]
)
