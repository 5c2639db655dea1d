"""The web demo (``histoclass serve``): upload H&E fields, get the verdict, member votes and a
Grad-CAM heat map; whole slides from a served folder. A leaf: nothing else imports it."""

from histoclass.app.fields import (
    DISPLAY_PX,
    UNCERTAIN_BAND,
    Limits,
    analyse,
    cam_available,
    describe,
    judge,
)
from histoclass.app.page import build, serve
from histoclass.app.slide import analyse_slide, slide_tab

__all__ = ["DISPLAY_PX", "UNCERTAIN_BAND", "Limits", "analyse", "analyse_slide", "build",
           "cam_available", "describe", "judge", "serve", "slide_tab"]
