"""Models: timm backbones under short member names, weights loading and checkpoints."""

from histoclass.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    member_meta,
    preprocess_of,
    read_checkpoint,
    save_checkpoint,
)
from histoclass.models.factory import (
    WeightsError,
    create_model,
    model_preprocess,
    resolve_device,
)
from histoclass.models.members import MEMBERS, V1_FAMILY, V2_FAMILY, resolve_arch

__all__ = [
    "MEMBERS", "V1_FAMILY", "V2_FAMILY", "CheckpointError", "WeightsError", "create_model",
    "load_checkpoint", "member_meta", "model_preprocess", "preprocess_of", "read_checkpoint",
    "resolve_arch", "resolve_device", "save_checkpoint",
]
