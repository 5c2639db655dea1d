"""Whole slides: tissue, tiles at the model's resolution, heat maps and QuPath-ready results.

``predict_slide(classifier, path, out)`` scores one slide into ``out/<stem>/`` (``tiles.csv``,
``heatmap.png``, ``heatmap.npy``, ``slide.geojson``, ``summary.json``, ``mask.png``,
``thumbnail.png``); ``predict_slides`` runs many and reports the bad ones. Needs the ``slides``
extra (OpenSlide, shapely).
"""

from histoclass.slides.batch import SLIDE_SUFFIXES, expand_slides, list_slides, predict_slides
from histoclass.slides.reader import Slide, SlideError
from histoclass.slides.run import SlideOptions, model_resolution, predict_slide

__all__ = [
    "SLIDE_SUFFIXES", "Slide", "SlideError", "SlideOptions", "expand_slides", "list_slides",
    "model_resolution", "predict_slide", "predict_slides",
]
