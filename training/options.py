"""argparse value types and help layout shared by train.py and the benchmarks."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every default but None ("not given")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def widths_type(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated channel widths, e.g. ``16,32,64``."""
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated ints") from None


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options typed in ``argv``, not those left at their defaults.

    argparse fills in a default only where the namespace lacks the attribute, so a namespace
    pre-filled with a marker shows which options the command line set.
    """
    unset = object()
    dests = vars(parser.parse_args(argv))
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {dest for dest, value in vars(typed).items() if value is not unset}
