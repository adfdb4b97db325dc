"""The ``safesearch`` script (and ``python -m safesearch``).

SIGINT and SIGTERM are taken over first thing, and the command line is imported inside the guard below,
so that an interrupt during start-up (importing the command line takes a moment) ends as one line and
exit code 130 too, never a traceback; once the command is over, whatever its exit code, both signals are
ignored so that nothing can break the interpreter's shutdown.
"""

from __future__ import annotations

import sys

from safesearch import interrupts


def main() -> None:
    interrupts.install()
    try:
        from safesearch.cli import main as cli_main
    except KeyboardInterrupt:
        interrupts.ignore()
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    try:
        cli_main()
    finally:
        interrupts.ignore()


if __name__ == "__main__":
    main()
