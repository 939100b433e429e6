"""Compatibility: the report now lives in ``segrefine.analysis`` (sources, rows, stats, render,
figures, cli). This module re-exports its public names, so ``from segrefine.report import ...``
and ``python -m segrefine.report`` keep working."""

from segrefine.analysis.cli import *  # noqa: F401,F403
from segrefine.analysis.render import *  # noqa: F401,F403
from segrefine.analysis.rows import *  # noqa: F401,F403
from segrefine.analysis.sources import *  # noqa: F401,F403
from segrefine.analysis.stats import *  # noqa: F401,F403
from segrefine.record.protocols import *  # noqa: F401,F403
from segrefine.analysis.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
