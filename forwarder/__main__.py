"""``python -m forwarder``, and the ``forwarder`` command."""

import sys

from forwarder.signals import StopAsked


def run() -> None:
    if sys.argv[1:2] == ["worker"]:
        StopAsked.catch()  # before the imports below: see forwarder.signals
    from forwarder.cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
