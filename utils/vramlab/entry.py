"""The ``vramlab`` command's entry point: Ctrl-C at any moment is one line and exit code 130.

The handler is installed before anything else is imported (argparse, the CLI, torch for a dry
run), so an interrupt during start-up, when a ``KeyboardInterrupt`` would surface from inside
some import as a traceback (or leave a half-imported module behind), ends the process at once.
The commands write no files that an immediate exit could leave half-written.
"""

from __future__ import annotations

import os
import signal
from typing import Any


def _interrupted(signum: int, frame: Any) -> None:
    try:
        os.write(2, b"vramlab: interrupted\n")
    finally:
        os._exit(130)


def main() -> int:
    """Install the interrupt handler, then run :func:`vramlab.cli.main`."""
    signal.signal(signal.SIGINT, _interrupted)
    from .cli import main as cli_main

    return cli_main()
