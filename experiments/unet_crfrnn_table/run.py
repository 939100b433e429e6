"""The origin study's table: ``segrefine-study unet_crfrnn_table`` (segrefine.study.origin),
kept as a script for checkouts: ``.venv/bin/python experiments/unet_crfrnn_table/run.py [options]``."""

import sys

from segrefine.study.origin import main

if __name__ == "__main__":
    sys.exit(main())
