"""Data layer: BreakHis names, scanning, manifests and leakage-safe splits.

This package's top level imports no torch; ``histoclass.data.dataset`` and
``histoclass.data.transforms`` (which do) are imported explicitly by the stages that train.
"""

from histoclass.data.breakhis import LABELS, MAGNIFICATIONS, SUBTYPES, parse_name
from histoclass.data.images import ImageLoadError, load_rgb
from histoclass.data.manifest import read_manifest, resolve_data, select, write_manifest
from histoclass.data.scan import ScanError, ScanResult, scan
from histoclass.data.splits import PROTOCOLS, audit, make_split

__all__ = [
    "LABELS", "MAGNIFICATIONS", "PROTOCOLS", "SUBTYPES", "ImageLoadError", "ScanError",
    "ScanResult", "audit", "load_rgb", "make_split", "parse_name", "read_manifest",
    "resolve_data", "scan", "select", "write_manifest",
]
