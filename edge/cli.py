"""Command line: ``edge run``, ``edge scan``, ``edge bench`` and ``edge check-config``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge import __version__
from edge.config import Config, load_config, parse_config
from edge.errors import ConfigError, EdgeError
from edge.memory import HEAP_ARENAS, limit_heap_arenas
from edge.notify import Notifier
from edge.signals import SignalInbox

logger = logging.getLogger("edge.cli")

#: Third-party loggers that are chatty at INFO.
_QUIET_LOGGERS = ("paho", "onnxruntime", "RapidOCR", "rapidocr_onnxruntime")
#: Upper bound on the errors ``edge check-config`` reports for one file.
_MAX_CONFIG_ERRORS = 100
#: Frame sides ``edge bench --size`` accepts, in pixels. The scene generator needs 64, and
#: 10000 is the upper bound of ``camera.width`` and ``camera.height``.
_BENCH_SIDES = (64, 10000)


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

    bench = commands.add_parser(
        "bench", help="time the detector, OCR, code decoding and the pipeline on this device"
    )
    bench.add_argument("--config", type=Path, help="TOML configuration file (default: built-in)")
    bench.add_argument(
        "--frames",
        type=_positive_int,
        default=5,
        metavar="N",
        help="generated frames to time each stage on (default: 5)",
    )
    bench.add_argument(
        "--size",
        type=_frame_size,
        metavar="WIDTHxHEIGHT",
        help="frame size in pixels (default: camera.width x camera.height of the "
        "configuration when both are set, else 1280x720)",
    )
    bench.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("config", type=Path, metavar="FILE")
    return parser


def _positive_int(text: str) -> int:
    """Parse an argument that must be a whole number of at least 1."""
    value: int | None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        msg = f"invalid value {text!r}: expected a whole number of at least 1"
        raise argparse.ArgumentTypeError(msg)
    return value


def _frame_size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` in pixels, such as ``1280x720``."""
    low, high = _BENCH_SIDES
    match = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", text)
    if match is None or not all(low <= int(side) <= high for side in match.groups()):
        msg = (
            f"invalid size {text!r}: expected WIDTHxHEIGHT in pixels, each side from {low} "
            f"to {high}, such as 1280x720"
        )
        raise argparse.ArgumentTypeError(msg)
    return int(match[1]), int(match[2])


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


def collect_config_errors(path: Path) -> list[ConfigError]:
    """Validate a configuration file and return every error found, each with its key path.

    :func:`~edge.config.load_config` stops at the first error. To find the next one, the
    offending key is removed, so its default applies, and the file is validated again. A key
    that still fails with its default ends the search, because the errors after it could
    follow from that default rather than from the file.

    Returns:
        The errors in the order found; empty when the file is valid. A file that is missing,
        unreadable or not TOML gives one error without a key.
    """
    try:
        load_config(path)
    except ConfigError as exc:
        if exc.key is None:
            return [exc]
        first = exc
    else:
        return []

    data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    base_dir = path.resolve().parent
    errors = [first]
    key: str | None = first.key
    while key is not None and _remove_key(data, key) and len(errors) < _MAX_CONFIG_ERRORS:
        try:
            parse_config(data, base_dir=base_dir)
        except ConfigError as exc:
            if exc.key in {e.key for e in errors}:
                break
            errors.append(exc)
            key = exc.key
        else:
            break
    return errors


def _remove_key(data: dict[str, Any], key: str) -> bool:
    """Delete the value at a dotted key path; return whether it was found.

    Table keys may contain dots themselves (``logging.levels."edge.pipeline"``), so at each
    level the longest key that prefixes the rest of the path is taken.
    """
    node: Any = data
    rest = key
    while isinstance(node, dict):
        if rest in node:
            del node[rest]
            return True
        heads = [k for k in node if rest.startswith(f"{k}.")]
        if not heads:
            return False
        head = max(heads, key=len)
        node = node[head]
        rest = rest[len(head) + 1 :]
    return False


def check_config(path: Path) -> int:
    """Print every error of a configuration file with its key path; return 0 if valid, else 1."""
    errors = collect_config_errors(path)
    if not errors:
        print(f"{path}: OK")
        return 0
    for error in errors:
        print(f"edge: {path}: {error}", file=sys.stderr)
    print(
        f"edge: {path}: {len(errors)} error(s); fix them and run check-config again",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    try:
        config = load_config(args.config)
    except EdgeError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 2
    configure_logging(config)
    # Before any thread starts: onnxruntime, the readers and the pipeline create theirs later.
    if limit_heap_arenas():
        logger.debug("threads share at most %d glibc heaps", HEAP_ARENAS)
    # Imported here, not at the top, so that importing edge.cli does not load OpenCV. An
    # `edge` script installed before edge.__main__.run was its entry point imports edge.cli
    # in every worker process.
    from edge.images import use_one_opencv_thread

    use_one_opencv_thread()
    try:
        if args.command == "scan":
            from edge.scan import scan

            failures = asyncio.run(scan(config, args.paths))
            return 1 if failures else 0
        if args.command == "bench":
            from edge.devbench import run_bench

            run_bench(config, frame_count=args.frames, size=args.size, as_json=args.json)
            return 0
        if args.max_frames is not None and args.max_frames < 1:
            print(f"edge: --max-frames must be at least 1, got {args.max_frames}", file=sys.stderr)
            return 2
        from edge.service import run_service

        # Installed once: a SIGTERM while a run starts, drains or reloads stops the daemon
        # cleanly instead of ending it at once (the default action).
        signals = SignalInbox()
        signals.install()
        while True:
            summary = asyncio.run(
                run_service(
                    config,
                    max_frames=args.max_frames,
                    stdout=args.stdout,
                    config_path=args.config,
                    signals=signals,
                )
            )
            if summary.reload_config is None:
                break
            if signals.stop_signum is not None:
                name = signal.Signals(signals.stop_signum).name
                logger.info("received %s while reloading, so not starting again", name)
                # The run sent RELOADING=1 to systemd, so send STOPPING=1 now.
                Notifier.from_environment().stopping("stopping instead of reloading")
                break
            config = summary.reload_config
            configure_logging(config)
            logger.info("configuration reloaded; starting again")
    except EdgeError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
