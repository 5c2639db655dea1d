"""The installed version, in one place that every file format can record without importing the
package's entry points."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histoclass")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
