"""Publishing: a self-contained folder (safetensors, timm's config.json, histoclass.json, a
model card, optionally WSInfer's format) and its upload to the Hugging Face hub. The folder is
read back by :mod:`histoclass.models.published` (``local-dir:``/``hf-hub:`` names)."""

from histoclass.deploy.publish.card import model_card
from histoclass.deploy.publish.folder import FORMATS, PushError, data_config, publish, push_folder

__all__ = ["FORMATS", "PushError", "data_config", "model_card", "publish", "push_folder"]
