"""Every ``taxiway`` command, built-in or from a plugin, has a help line in ``taxiway --help``
(and in its group's help) that says what it does: no bare "NAME commands", no empty line."""

from __future__ import annotations

import argparse

from gateway.cli import _Builtins, build_parser
from gateway.plugins import load_plugins


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_every_command_has_a_help_line() -> None:
    parser = build_parser(load_plugins(extra=[("gateway.cli", _Builtins())]).commands())
    missing = []
    todo = [((), parser)]
    while todo:
        path, current = todo.pop()
        action = _subcommands(current)
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, sub in action.choices.items():
            help_line = helps.get(name) or ""
            if len(help_line) < 15 or help_line == f"{name} commands":
                missing.append(" ".join((*path, name)))
            if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                todo.append(((*path, name), sub))
    assert not missing, missing
    assert {"serve", "chat", "ps", "rm", "show", "plan", "pull", "bench"} <= set(_subcommands(parser).choices)
