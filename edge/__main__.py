"""Entry point of ``python -m edge`` and of the ``edge`` script.

It imports the command line only when called. A worker process started with "spawn" runs
the imports of the ``edge`` script again, and a code-reading worker needs none of the
daemon's modules that ``edge.cli`` imports (asyncio, TLS, configuration).
"""

from __future__ import annotations


def run() -> int:
    """Run the command line and return the exit status."""
    from edge.cli import main

    return main()


if __name__ == "__main__":
    raise SystemExit(run())
