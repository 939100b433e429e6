"""segrefine: how much does each segmentation post-processing head buy, at what cost?"""

__all__ = ["IGNORE_INDEX", "BackboneOutput"]
__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (tool.setuptools.dynamic)


def __getattr__(name: str):
    # Lazy, so torch-free parts (the report, its figures) do not pay torch's import time.
    if name in __all__:
        from segrefine import types

        return getattr(types, name)
    raise AttributeError(f"module 'segrefine' has no attribute {name!r}")
