"""A self-contained HTML report of an evaluation (:mod:`~histoclass.report.page`), its figures
and tables (:mod:`~histoclass.report.parts`) and its calibration section
(:mod:`~histoclass.report.calibration`)."""

from histoclass.report.page import render, thumbnail, write_report
from histoclass.report.parts import fmt

__all__ = ["fmt", "render", "thumbnail", "write_report"]
