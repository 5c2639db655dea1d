"""histoclass: breast-cancer histopathology classification with EfficientNet ensembles.

Data flows one way: ``data``/``stain``/``metrics`` -> ``models`` -> ``predict``/``explain`` ->
``train``/``evaluate``/``report`` -> ``cli``/``app``. Files are the interfaces between stages:
a split manifest CSV, a self-describing checkpoint and a predictions CSV.
"""

from histoclass._version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name: str):  # PEP 562: ``histoclass.load`` without importing torch up front
    if name == "load":
        from histoclass.api import load

        return load
    raise AttributeError(f"module 'histoclass' has no attribute {name!r}")
