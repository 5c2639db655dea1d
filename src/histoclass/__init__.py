"""histoclass: breast-cancer histopathology classification with EfficientNet ensembles.

Data flows one way: ``data``/``stain``/``metrics`` -> ``models`` -> ``predict``/``explain`` ->
``train``/``evaluate``/``report`` -> ``cli``/``app``. Files are the interfaces between stages:
a split manifest CSV, a self-describing checkpoint and a predictions CSV.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histoclass")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
