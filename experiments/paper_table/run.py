"""The paper-table study: ``segrefine-study paper_table`` (segrefine.study.paper_table), kept
as a script for checkouts: ``.venv/bin/python experiments/paper_table/run.py [options]``."""

import sys

from segrefine.study.paper_table import main

if __name__ == "__main__":
    sys.exit(main())
