"""Engine subcommands for the ``taxiway`` CLI (registered in ``backends.engine``).

Kept free of torch: building the CLI imports this module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.errors import ConfigError


def configure_pull(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``taxiway pull NAME``."""
    from backends.engine.catalogue import CATALOGUE

    parser.description = "Download a catalogue model into the model cache and print its path."
    parser.add_argument(
        "name", nargs="?", help=f"catalogue model name (one of: {', '.join(sorted(CATALOGUE))})"
    )
    parser.add_argument(
        "--home", type=Path, default=None, help="Taxiway home (default: $TAXIWAY_HOME or ~/.cache/taxiway)"
    )
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run_pull(args: argparse.Namespace) -> int:
    """Pull ``args.name``; print the cached file's path on stdout. Returns the exit code."""
    from backends.engine.catalogue import CATALOGUE, PullError, cached_path, default_home, pull

    home = args.home if args.home is not None else default_home()
    if args.list or not args.name:
        for entry in CATALOGUE.values():
            state = "cached" if cached_path(entry, home).is_file() else "not pulled"
            print(f"{entry.name}\t{state}\t{entry.description}")
        return 0 if args.list else 2
    try:
        path = pull(args.name, home=home, progress=not args.quiet)
    except (ConfigError, PullError) as exc:
        print(f"taxiway pull: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
