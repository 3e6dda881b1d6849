"""Entry point of the catalogue writer process: ``python -m acc_bluesky.data._writer_main RFD WFD``."""

import logging
import sys
import warnings

from acc_bluesky.data.writer import _child_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="acc-bluesky catalogue writer: %(levelname)s %(message)s")
    warnings.simplefilter("ignore")  # the parent reports what matters (backups, errors)
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
