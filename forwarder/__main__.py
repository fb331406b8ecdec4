"""``python -m forwarder`` is the ``forwarder`` command."""

import sys

from forwarder.cli import main

sys.exit(main())
