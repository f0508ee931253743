"""Command line: ``edge run``, ``edge scan`` and ``edge check-config``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edge import __version__
from edge.config import Config, load_config
from edge.errors import EdgeError

logger = logging.getLogger("edge.cli")

#: Third-party loggers that are chatty at INFO.
_QUIET_LOGGERS = ("paho", "onnxruntime", "RapidOCR", "rapidocr_onnxruntime")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, help="TOML configuration file (default: built-in)")
    run.add_argument(
        "--max-frames", type=int, metavar="N", help="stop after N frames (default: no limit)"
    )
    run.add_argument(
        "--stdout", action="store_true", help="also print each frame result as a JSON line"
    )

    scan = commands.add_parser("scan", help="read images once, print one JSON result each")
    scan.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image file or folder")
    scan.add_argument("--config", type=Path, help="TOML configuration file (default: built-in)")

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("config", type=Path, metavar="FILE")
    return parser


def configure_logging(config: Config | None, verbose: bool = False) -> None:
    """Send log records to stderr, one line each; journald adds the time stamp."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel("DEBUG" if verbose else (config.logging.level if config else "INFO"))
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if config:
        for name, level in config.logging.levels.items():
            logging.getLogger(name).setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except EdgeError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 2 if args.command != "check-config" else 1
    configure_logging(config)
    if args.command == "check-config":
        print(f"{args.config}: OK")
        return 0
    try:
        if args.command == "scan":
            from edge.scan import scan

            failures = asyncio.run(scan(config, args.paths))
            return 1 if failures else 0
        if args.max_frames is not None and args.max_frames < 1:
            print(f"edge: --max-frames must be at least 1, got {args.max_frames}", file=sys.stderr)
            return 2
        from edge.service import run_service

        asyncio.run(run_service(config, max_frames=args.max_frames, stdout=args.stdout))
    except EdgeError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
