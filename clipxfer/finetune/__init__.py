"""Fine-tuning the encoder itself; ``clipxfer finetune`` is a thin layer over :func:`run_finetune`.

The result is one adapter file (:mod:`clipxfer.encoders.adapter`): the moved tensors or LoRA factors,
the head and the metadata. It defines a new encoder id; ``--model BASE+ADAPTER.safetensors`` (resolved
in :mod:`clipxfer.encoders.registry`) loads that encoder for every command. The recipe and the training
loop are in :mod:`.train` (its settings in :mod:`.settings`; what moves in :mod:`.parameters` and :mod:`.lora`;
the images in :mod:`.pixels`; the working model in :mod:`.model`; WiSE-FT in :mod:`.wise`); :mod:`.head`
fits the fine-tuning head the benchmark and :func:`run_finetune` save.
"""

from .head import fit_finetune_head
from .run import run_finetune
from .settings import METHODS, FinetuneSettings

__all__ = ["run_finetune", "fit_finetune_head", "FinetuneSettings", "METHODS"]
