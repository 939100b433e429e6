"""Compatibility: the report's figures now live in ``segrefine.analysis.figures``; this name is
that module (not a copy), so ``from segrefine import figures`` and patches of it reach the code
the report runs."""

import sys

from segrefine.analysis import figures as _figures

sys.modules[__name__] = _figures
