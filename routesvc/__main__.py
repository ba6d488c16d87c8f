"""``python -m routesvc`` and the ``routesvc`` command.

``serve`` takes the stop signals before anything else is imported (``routesvc.signals``), so
that one sent while it starts stops it cleanly, PID 1 in a container included.
"""

import sys

from routesvc.signals import note_stop_signals


def main() -> int:
    """Run the command line; returns the exit code."""
    # The parser has no option before the command, so this is the command it will find.
    if sys.argv[1:2] == ["serve"]:
        note_stop_signals()
    from routesvc.cli import main as run  # imported once the signals are taken

    return run()


if __name__ == "__main__":
    sys.exit(main())
