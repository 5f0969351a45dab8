"""Training: one loop, and what each kind of run changes in it.

- :mod:`staterank.training.loop`: the loop (AdamW, warmup and cosine, clipping, gradient accumulation,
  DDP under torchrun, checkpoints and bit-identical resume, a validation hook) and its helpers;
- :mod:`staterank.training.pretrain`: ``train``, pretraining a small model from a config (``staterank train``);
- :mod:`staterank.training.lora`: ``finetune``, LoRA recovery with optional distillation (``staterank finetune``).

The public entry points are :func:`staterank.api.train` and :func:`staterank.api.finetune`.
"""
