"""Training: fine-tune ensemble members with the study's recipe (``histoclass train``).

The package reads top-down, each module importing only those above it:

* :mod:`~histoclass.train.config`: :class:`TrainConfig`, its choices and checks.
* :mod:`~histoclass.train.distributed`: the process group under ``torchrun``.
* :mod:`~histoclass.train.data`: manifest rows, loaders, sampling, stain step.
* :mod:`~histoclass.train.epoch`: one training epoch, evaluation, metrics, selection.
* :mod:`~histoclass.train.records`: RNG state, ``config.yaml``, ``history.csv``, curves.
* :mod:`~histoclass.train.features`: frozen-backbone embeddings and their on-disk cache.
* :mod:`~histoclass.train.linear`: ``--head linear``, a logistic-regression probe folded into
  timm's classifier layer.
* :mod:`~histoclass.train.loop`: :func:`train`, the driver of one run.
* :mod:`~histoclass.train.many`: :func:`train_all`, several members in turn.
* :mod:`~histoclass.train.ensembles`: :func:`fit_ensemble`, an ensemble fitted on validation.
"""

from histoclass.train.config import TrainConfig
from histoclass.train.ensembles import fit_ensemble, preset_members
from histoclass.train.epoch import NonFiniteLossError
from histoclass.train.loop import train
from histoclass.train.many import finished, train_all

__all__ = ["NonFiniteLossError", "TrainConfig", "finished", "fit_ensemble", "preset_members",
           "train", "train_all"]
