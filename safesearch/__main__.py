"""The ``safesearch`` script (and ``python -m safesearch``).

The command line's own module is imported inside the guard below, so that a Ctrl-C during start-up
(importing the command line takes a moment) ends as one line and exit 130 too, never a traceback; once
a command has ended on an interrupt, further Ctrl-Cs cannot break the interpreter's shutdown.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    try:
        from safesearch.cli import INTERRUPTED
        from safesearch.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    try:
        cli_main()
    except SystemExit as e:
        if e.code == INTERRUPTED:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise


if __name__ == "__main__":
    main()
