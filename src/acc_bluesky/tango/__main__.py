"""``python -m acc_bluesky.tango PROFILE [--port P] ...``: the twin's Tango server."""

import sys

from .app import main

sys.exit(main())
