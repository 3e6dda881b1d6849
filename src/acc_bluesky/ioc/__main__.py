"""``python -m acc_bluesky.ioc {serve,shadow} PROFILE ...``: see :mod:`acc_bluesky.ioc.app`."""

import sys

from .app import main

sys.exit(main())
