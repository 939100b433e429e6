"""segrefine: how much does each segmentation post-processing head buy, at what cost?"""

from segrefine.types import IGNORE_INDEX, BackboneOutput

__all__ = ["IGNORE_INDEX", "BackboneOutput"]
__version__ = "0.1.0"
