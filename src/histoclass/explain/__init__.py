"""Explanations: class activation maps for members and ensembles, figures, galleries, and which
CAM method to trust (faithfulness scores)."""

from histoclass.explain.cam import (
    METHODS,
    Explanation,
    candidate_layers,
    class_index,
    compute_cam,
    eigen_projection,
    explain_image,
    find_target_layer,
    model_input,
    resize_map,
)
from histoclass.explain.ensemble import (
    EnsembleExplanation,
    cam_weights,
    explain_ensemble,
    explain_model,
)
from histoclass.explain.faithfulness import format_table, score_methods
from histoclass.explain.figures import ensemble_figure, explanation_figure, overlay
from histoclass.explain.gallery import BatchResult, explain_batch, write_gallery

__all__ = [
    "METHODS", "BatchResult", "EnsembleExplanation", "Explanation", "cam_weights",
    "candidate_layers", "class_index", "compute_cam", "eigen_projection", "ensemble_figure",
    "explain_batch", "explain_ensemble", "explain_image", "explain_model", "explanation_figure",
    "find_target_layer", "format_table", "model_input", "overlay", "resize_map",
    "score_methods", "write_gallery",
]
