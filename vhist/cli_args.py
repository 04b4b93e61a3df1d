"""Pieces every ``vhist`` subcommand's parser shares: the exit code of an expected error
and the ``--debug`` flag. The command modules (vhist.train.cli, vhist.report, ...) and
vhist/__main__.py, which sits on top of them, import these from here."""
from __future__ import annotations

import argparse

EXIT_USAGE = 2  # an expected error (bad arguments, data, checkpoints, devices or backends)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on a (sub)parser: show the traceback of an expected error too."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an expected error (also VHIST_DEBUG=1)")
