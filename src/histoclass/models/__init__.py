"""Models: timm backbones under short member names, checkpoints, ensembles and the one loader."""

from histoclass.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    member_meta,
    preprocess_of,
    read_checkpoint,
    save_checkpoint,
)
from histoclass.models.classifier import Classifier, Preparation, Scores
from histoclass.models.ensemble import (
    Ensemble,
    Member,
    ensemble_of,
    load_member,
    load_model_file,
)
from histoclass.models.factory import (
    WeightsError,
    create_model,
    model_preprocess,
    resolve_device,
)
from histoclass.models.members import (
    FAMILIES,
    MEMBERS,
    V1_FAMILY,
    V2_FAMILY,
    member_names,
    resolve_arch,
)

__all__ = [
    "FAMILIES", "MEMBERS", "V1_FAMILY", "V2_FAMILY", "CheckpointError", "Classifier",
    "Ensemble", "Member", "Preparation", "Scores", "WeightsError", "create_model", "ensemble_of",
    "load_checkpoint", "load_member", "load_model_file", "member_meta", "member_names",
    "model_preprocess", "preprocess_of", "read_checkpoint", "resolve_arch", "resolve_device",
    "save_checkpoint",
]
