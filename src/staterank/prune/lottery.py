"""The rounds of lottery-ticket channel pruning (:class:`~staterank.prune.channels.lottery.LotteryCriterion`).

What is rewound: every weight. Each round fine-tunes a copy of the original model cut to the channels still
kept, so the fine-tuned values never reach the written model; the kept channels' q/k rows (and everything
else) are the original ones. What is scored: the magnitude of each kept channel's q and k rows after the
round's fine-tuning of the q, k and v projections (``adapter.lora_targets``; the rest of the model frozen).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from staterank.loading import LoadedModel
from staterank.models import adapter_for
from staterank.prune.channels.base import ChannelSelection
from staterank.prune.channels.lottery import LotteryCriterion, round_dims
from staterank.training.loop import next_token_loss, train_loop


def fine_tune_projections(model: torch.nn.Module, sequences: torch.Tensor, criterion: LotteryCriterion,
                          batch_size: int, seed: int, progress: bool, name: str) -> list[dict[str, float]]:  # fmt: skip
    """Train the q, k and v projections of ``model`` (the adapter's ``lora_targets``; every other weight frozen)
    for ``criterion.train_steps`` steps at a constant ``criterion.lr``; returns the logged losses."""
    adapter = adapter_for(model)
    targets = adapter.lora_targets
    trained = []
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            # PEFT's rule for target_modules: the module's name, or its dotted suffix (OLMo's "linear_attn.q_proj")
            param.requires_grad_(any(module_name == t or module_name.endswith(f".{t}") for t in targets))
            if param.requires_grad:
                trained.append(param)
    options = {"steps": criterion.train_steps, "batch_size": min(batch_size, sequences.shape[0]), "lr": criterion.lr,
               "warmup_steps": 0, "min_lr_ratio": 1.0, "grad_clip": 1.0, "seed": seed}  # fmt: skip

    def loss(m, batch):
        return {"loss": next_token_loss(m(input_ids=batch).logits, batch)}

    with tempfile.TemporaryDirectory() as unused:  # no checkpoints: a round is short and is not resumed
        state = train_loop(model, loss, [{"params": trained, "weight_decay": 0.0}], sequences, options, (),
                           Path(unused), progress=progress, name=name)  # fmt: skip
    model.eval()
    return state.losses


def lottery_rounds(
    loaded: LoadedModel,
    criterion: LotteryCriterion,
    head_k_dim: int,
    final_dim: int,
    sequences: torch.Tensor,
    batch_size: int,
    seed: int,
    progress: bool,
    generator: torch.Generator,
) -> tuple[dict[int, ChannelSelection], list[dict]]:
    """Run the rounds on copies of ``loaded.model`` (left untouched); return the last round's selections, in
    the original channel numbering, and a record of every round."""
    adapter = loaded.adapter
    layers = adapter.linear_layers()
    kept = {layer: torch.arange(head_k_dim).repeat(adapter.layer_shape(layer).num_k_heads, 1) for layer in layers}
    selections: dict[int, ChannelSelection] = {}
    rounds = []
    dims = round_dims(head_k_dim, final_dim, criterion.steps)
    for number, dim in enumerate(dims, start=1):
        work = copy.deepcopy(loaded.model)  # the original weights: the rewind
        work_adapter = adapter_for(work)
        if number > 1:
            work_adapter.keep_qk_channels(kept)
        losses = fine_tune_projections(
            work, sequences, criterion, batch_size, seed + number, progress, f"lottery round {number}/{len(dims)}"
        )
        for layer in layers:
            weights = tuple(w.detach().float().cpu() for w in work_adapter.qk_weights(layer))
            local = criterion.select(None, weights, dim, generator)  # among the channels this round started with
            original = kept[layer].gather(1, local.index)  # back to the original channel numbers
            scores = torch.full((original.shape[0], head_k_dim), float("nan"), dtype=torch.float64)
            scores.scatter_(1, kept[layer], local.scores)
            selections[layer] = ChannelSelection(original, scores=scores)
            kept[layer] = original
        rounds.append({
            "round": number,
            "head_k_dim": dim,
            "train_steps": criterion.train_steps,
            "losses": losses,  # the fine-tuning's logged mean losses, {"step", "loss"}
            "kept": {str(layer): {str(h): row.tolist() for h, row in enumerate(kept[layer])} for layer in layers},
        })  # fmt: skip
        del work, work_adapter
    return selections, rounds
