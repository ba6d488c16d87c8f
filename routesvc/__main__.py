"""``python -m routesvc``: the same as the ``routesvc`` command."""

import sys

from routesvc.cli import main

sys.exit(main())
