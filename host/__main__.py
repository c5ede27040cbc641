"""``python -m gemu.host`` runs the ``gemu`` command line."""

import sys

from gemu.host.cli import main

sys.exit(main())
