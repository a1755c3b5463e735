"""`taxiway bench gateway`: the gateway's added latency in front of an instant upstream."""

from __future__ import annotations

from argparse import ArgumentParser, Namespace


def configure(parser: ArgumentParser) -> None:
    pass


def run(args: Namespace) -> int:
    """Measure the gateway's added latency and throughput against a stub upstream."""
    raise NotImplementedError
