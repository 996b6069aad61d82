"""The command-line conventions of the project's commands (store's and dissect_dist's):
an error is one line on stderr, names the bad input, and exits with status 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, with a one-line error on bad input (status 2) instead of usage + error.
    Subcommand parsers made by add_subparsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(prog: str, message: str) -> int:
    """One line on stderr for input the parser accepted but the command cannot use;
    returns the status to exit with (2)."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return 2
