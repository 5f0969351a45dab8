"""Model cards: the ``README.md`` every model staterank writes carries, in Hugging Face's convention.

A card is YAML front matter (``base_model``, ``library_name``, ``tags``, ``pipeline_tag``) and a Markdown
body: what was done, the measured recurrent-state bytes, the layer shapes, how to load the model and what
serving it needs. The builders are pure functions of plain dicts: the pruning report (``pruning.json``), the
finetune and train summaries (``finetune.json``, ``training.json``) and the written model's facts
(:func:`model_facts`). The writers call them inside their atomic output blocks, so a card is never missing
from, or stale beside, the weights it describes.

    card = prune_card(report, model_facts(loaded.model), path=str(out), base_model="org/name")
    write_model_card(tmp, card)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from staterank.loading import BUNDLED, LoadedModel
from staterank.models import LayerShape, adapter_class, adapter_for

_PLAIN_YAML = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


# --- the model's facts and names ------------------------------------------------------------------


def model_facts(model: PreTrainedModel) -> dict[str, Any]:
    """What a card says about a model as written: its type, family, dtype, layer shapes and state bytes.

    The keys are those of ``staterank info --json`` that a card needs, plus ``state_dtype`` (the dtype the
    recurrent states are cached in).
    """
    adapter = adapter_for(model)
    dtype = next(model.parameters()).dtype
    return {
        "model_type": model.config.model_type,
        "family": adapter.family,
        "dtype": str(dtype).removeprefix("torch."),
        "state_dtype": str(adapter.state_dtype or dtype).removeprefix("torch."),
        "layers": [shape.as_dict() for shape in adapter.shapes()],
        "state_bytes_per_seq": adapter.state_bytes_per_seq(),
    }


def source_name(model: str | os.PathLike | LoadedModel, path: Path) -> str:
    """How a card names the model a run started from: the hub id or bundled name it was given as, else the
    directory it loaded from.

    ``model`` is the caller's MODEL argument and ``path`` the local directory it resolved to; a MODEL that
    loaded but is neither a bundled name nor an existing path was a hub id.
    """
    if isinstance(model, str) and (model in BUNDLED or not Path(model).expanduser().exists()):
        return model
    return str(path)


def pruning_report(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The pruning.json that ``staterank prune`` wrote beside a model, or None for a model it did not prune."""
    report = Path(directory) / "pruning.json"
    try:
        return json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- the three cards --------------------------------------------------------------------------------


def prune_card(report: dict[str, Any], model: dict[str, Any], path: str, base_model: str | None = None) -> str:
    """The card of a model written by ``staterank prune``.

    ``report`` is pruning.json's dict, ``model`` the pruned model's :func:`model_facts`, ``path`` the output
    directory and ``base_model`` the source model's hub id or path (default: the report's ``model``).
    """
    base_model = base_model or report["model"]
    heads = "removed" in report
    what = "linear-attention heads removed" if heads else "query/key channels pruned"
    sections = [
        f"# {Path(path).name}",
        f"`{base_model}` with {what} by staterank (`staterank prune --method {report['method']}`).",
        "## What was done",
        _table(_pruning_rows(report)),
    ]
    if heads:
        sections.append(_removed_heads_table(report["removed"], model))
    sections += [
        _state_section(model, before=report["state_bytes_before"]),
        _shapes_section(model),
        _load_section(model, path),
        _serve_section(model),
    ]
    tags = ["pruned", "head-pruning" if heads else "qk-channel-pruning"]
    return _card(base_model, _tags(model, tags), sections)


def finetune_card(
    summary: dict[str, Any],
    model: dict[str, Any],
    path: str,
    base_model: str,
    pruning: dict[str, Any] | None = None,
) -> str:
    """The card of a model written by ``staterank finetune``.

    ``summary`` is finetune.json's dict, ``model`` the merged model's :func:`model_facts`, ``base_model`` the
    fine-tuned model's hub id or path, and ``pruning`` that model's pruning.json, when staterank pruned it.
    """
    opts = summary["options"]
    teacher = opts["teacher"]
    sections = [
        f"# {Path(path).name}",
        f"`{base_model}` after LoRA recovery fine-tuning"
        + (" with distillation from its teacher" if teacher else "")
        + " by staterank (`staterank finetune`); the LoRA weights are merged, so this is a plain model.",
        "## What was done",
        _table(_finetune_rows(summary)),
    ]
    tags = ["lora", *(["distillation"] if teacher else [])]
    if pruning is not None:
        # The pruning run measured in its own dtype, so its numbers stay beside its other facts.
        state = ("state bytes per sequence", f"{pruning['state_bytes_before']:,} -> {pruning['state_bytes_after']:,}")
        sections += [
            f"The fine-tuned model was itself pruned by staterank from `{pruning['model']}`:",
            _table([*_pruning_rows(pruning), state]),
        ]
        tags += ["pruned", "head-pruning" if "removed" in pruning else "qk-channel-pruning"]
    sections += [
        _state_section(model),
        _shapes_section(model),
        _load_section(model, path),
        _serve_section(model),
    ]
    return _card(base_model, _tags(model, tags), sections)


def train_card(summary: dict[str, Any], model: dict[str, Any], path: str) -> str:
    """The card of a model written by ``staterank train``: trained from scratch, so without ``base_model``.

    ``summary`` is training.json's dict and ``model`` the trained model's :func:`model_facts`.
    """
    sections = [
        f"# {Path(path).name}",
        f"A {model['family']} language model trained from scratch (random initialisation, no base model) "
        "by staterank (`staterank train`).",
        "## What was done",
        _table(_train_rows(summary)),
        _state_section(model),
        _shapes_section(model),
        _load_section(model, path),
        _serve_section(model),
    ]
    return _card(None, _tags(model, []), sections)


def mqar_section(facts: dict[str, Any]) -> str:
    """The MQAR section of a recall model's card: the exact token layout and the measured accuracies
    (training.json's ``"mqar"``: the layout, and the accuracy by shape on ``examples`` drawn with ``seed``)."""
    layout = facts["layout"]
    k_low, k_high = layout["key_ids"]
    v_low, v_high = layout["value_ids"]
    lines = [
        "## Multi-query associative recall (MQAR)",
        "",
        f"Trained on MQAR with {layout['pairs']} key-value pairs in sequences of {layout['seq_len']} tokens. "
        "The layout, also in `mqar.json`:",
        "",
        f"- token ids: 0 is `<eos>` and never appears; keys are ids {k_low}..{k_high - 1} (tokens `k0`..), "
        f"values ids {v_low}..{v_high - 1} (tokens `v0`..); no separators;",
        "- an example: `k_1 v_1 ... k_P v_P` (P distinct keys drawn uniformly without replacement, values drawn "
        "uniformly with replacement), then queries `q_1 a_1 ... q_Q a_Q` filling the rest of the sequence, "
        "Q = (seq_len - 2P) / 2, each `q_j` a context key drawn uniformly with replacement and `a_j` its value;",
        "- scored: every answer `a_j`, the argmax over the whole vocabulary of the logits at `q_j`'s position "
        "(zero-based 2P + 2j); accuracy is the share of correct answers over all queries of all examples.",
        "",
        f"Accuracy measured after training ({facts['examples']} examples per row, drawn with "
        f"`staterank.mqar.examples(layout, {facts['examples']}, seed={facts['seed']})`; "
        "`staterank evaluate MODEL --tasks mqar --mqar-pairs P --mqar-seq-len T "
        f"--mqar-examples {facts['examples']} --seed {facts['seed']}` reproduces a row):",
        "",
        "| pairs | sequence length | queries | accuracy |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in facts["accuracy"]:
        queries = (row["seq_len"] - 2 * row["pairs"]) // 2
        lines.append(f"| {row['pairs']} | {row['seq_len']} | {queries} | {row['accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | os.PathLike, text: str) -> Path:
    """Write TEXT as ``DIRECTORY/README.md`` (the writers call this inside their atomic output directory)."""
    card = Path(directory) / "README.md"
    card.write_text(text, encoding="utf-8")
    return card


# --- what was done --------------------------------------------------------------------------------------


def _pruning_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Method, ratios, what was cut, calibration and seed of a pruning report."""
    heads = "removed" in report
    rows = [
        ("method", f"`{report['method']}` ({'head' if heads else 'query/key channel'} pruning)"),
        ("requested ratio", f"{report['ratio']:g}"),
    ]
    if report.get("kept_ratio") is not None:
        what = "linear-attention value heads" if heads else "query/key channels"
        rows.append(("fraction actually removed", f"{report['kept_ratio']:.4g} of the {what}"))
    if heads:
        if report.get("unit"):
            rows.append(("unit removed", str(report["unit"]).replace("_", " ")))
        rows.append(
            ("scope", "whole model (per-layer head counts)" if report.get("scope") == "global" else "per layer")
        )
    else:
        before, after = report["head_k_dim_before"], report["head_k_dim_after"]
        requested = report.get("head_k_dim_requested")
        aligned = f" (floor({before} x (1 - {report['ratio']:g})) = {requested}, aligned down)"
        note = aligned if requested not in (None, after) else ""
        rows.append(("d_k per head", f"{before} -> {after}{note}; the kept channels of every head are in pruning.json"))
        if report.get("rotated"):
            rows.append(("rotation", "q and k rotated onto the keys' principal subspace before the cut"))
    if report.get("options"):
        rows.append(("options", ", ".join(f"{k}={v}" for k, v in report["options"].items())))
    rows.append(("calibration", _calibration(report)))
    rows.append(("seed", str(report["seed"])))
    return rows


def _calibration(report: dict[str, Any]) -> str:
    if not report.get("calib_tokens"):
        return f"none (`{report['method']}` needs no data)"
    return f"{report['calib_tokens']:,} tokens of `{report['data']}`, in sequences of {report['seq_len']}"


def _removed_heads_table(removed: dict[str, list[int]], model: dict[str, Any]) -> str:
    """Per layer: the value heads removed (indices in the source model) and the value heads left."""
    left = {str(layer["layer"]): layer["num_v_heads"] for layer in model["layers"]}
    rows = [
        f"| {layer} | {len(heads)} | {', '.join(map(str, heads)) or '-'} | {left[layer]} |"
        for layer, heads in sorted(removed.items(), key=lambda item: int(item[0]))
    ]
    header = [
        "| layer | value heads removed | which (source indices) | value heads left |",
        "| ---: | ---: | --- | ---: |",
    ]
    return "\n".join([*header, *rows])


def _finetune_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    opts = summary["options"]
    rows = [
        (
            "LoRA",
            f"rank {opts['lora_rank']}, alpha {opts['lora_alpha']}, dropout {opts['lora_dropout']:g} on "
            f"{', '.join(f'`{t}`' for t in opts['lora_targets'])}; merged into the weights",
        ),
        ("data", f"`{summary['data']}`"),
        (
            "steps",
            f"{summary['steps']:,} of {opts['batch_size']} x {opts['seq_len']} tokens "
            f"({summary['tokens_seen']:,} tokens)",
        ),
    ]
    if opts["teacher"]:
        rows.append(
            (
                "teacher",
                f"`{opts['teacher']}`: loss (1 - {opts['kd_weight']:g}) x LM + {opts['kd_weight']:g} "
                f"x T^2 KL(teacher || student) at T = {opts['kd_temp']:g}",
            )
        )
    else:
        rows.append(("teacher", "none (language-modelling loss only)"))
    rows += [
        ("optimizer", _optimizer(opts)),
        ("final loss", f"{summary['final_loss']:.4f} (mean of the last logged steps)"),
        ("trainable parameters", f"{summary['trainable_params']:,}"),
        ("seed", str(opts["seed"])),
        ("time", f"{summary['seconds']:g} s of training steps on {_devices(summary)}"),
    ]
    return rows


def _train_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    opts = summary["options"]
    rows = [
        ("parameters", f"{summary['params']:,}"),
        ("data", f"`{summary['data']}` ({summary['train_tokens']:,} tokens)"),
        (
            "steps",
            f"{summary['steps']:,} of {opts['batch_size']} x {opts['seq_len']} tokens "
            f"({summary['tokens_seen']:,} tokens, {summary['epochs']:g} epochs)",
        ),
        ("optimizer", f"{_optimizer(opts)}, weight decay {opts['weight_decay']:g}"),
        ("final training loss", f"{summary['final_train_loss']:.4f} (mean of the last logged steps)"),
    ]
    if summary["val_history"]:
        last = summary["val_history"][-1]
        if "ppl" in last:
            what = f"perplexity {last['ppl']:.2f} on `{opts['val_data']}`"
        else:  # a synthetic task's held-out examples
            what = f"accuracy {last['accuracy']:.4f} on held-out `{summary['data']}` examples"
        rows.append(("validation", f"{what} at step {last['step']:,}"))
    rows += [
        ("seed", str(opts["seed"])),
        ("time", f"{summary['seconds']:g} s of training steps on {_devices(summary)}"),
    ]
    return rows


def _optimizer(opts: dict[str, Any]) -> str:
    return (
        f"AdamW, lr {opts['lr']:g}, linear warmup over {opts['warmup_steps']} steps, cosine decay to "
        f"{opts['min_lr_ratio']:g} x lr, gradient clipping {opts['grad_clip']:g}"
    )


def _devices(summary: dict[str, Any]) -> str:
    world = summary.get("world_size", 1)
    return f"{world} x {summary['device']}" if world > 1 else str(summary["device"])


# --- state, shapes, loading, serving ---------------------------------------------------------------------


def _state_section(model: dict[str, Any], before: int | None = None) -> str:
    """The recurrent-state bytes per sequence, and the source model's (``before``) when there is one."""
    now = model["state_bytes_per_seq"]
    rows = [("this model", f"{now:,}")]
    if before is not None:
        rows = [("source model", f"{before:,}"), ("this model", f"{now:,} ({now / before:.1%} of the source's)")]
    return "\n\n".join(
        [
            "## Recurrent state",
            _table(rows, header=("", "bytes per sequence")),
            f"The recurrent states of all linear-attention layers ({model['state_dtype']}) plus their "
            f"short-convolution caches, for one sequence, with the weights in {model['dtype']}; a batch holds this "
            "once per sequence, independent of its length.",
        ]
    )


def _shapes_section(model: dict[str, Any]) -> str:
    """The linear-attention layers' head layout: one line when every layer is the same, else a row per layer."""
    layouts = {_layout(layer) for layer in model["layers"]}
    indices = ", ".join(str(layer["layer"]) for layer in model["layers"])
    header = f"## Shapes\n\n{model['family']}, model_type `{model['model_type']}`; linear-attention layers {indices}."
    if len(layouts) == 1:
        return f"{header} Every one: {layouts.pop()}."
    rows = [f"| {layer['layer']} | {_layout(layer)} |" for layer in model["layers"]]
    return "\n".join([header, "", "| layer | heads |", "| ---: | --- |", *rows])


def _layout(layer: dict[str, int]) -> str:
    return (
        f"key heads {layer['num_k_heads']}, value heads {layer['num_v_heads']}, "
        f"d_k {layer['head_k_dim']}, d_v {layer['head_v_dim']}"
    )


def _load_section(model: dict[str, Any], path: str) -> str:
    """A loading snippet with the import the family needs before transformers knows its model_type."""
    first, note = adapter_class(model["model_type"]).load_import(model["model_type"])
    first = f"{first}\n" if first else ""
    snippet = (
        f"```python\n{first}from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"path = {path!r}\nmodel = AutoModelForCausalLM.from_pretrained(path)\n"
        "tokenizer = AutoTokenizer.from_pretrained(path)\n```"
    )
    return "\n\n".join(["## How to load it", snippet, note])


def _serve_section(model: dict[str, Any]) -> str:
    """The serving constraints the family's adapter states for this model's shapes (DESIGN.md, serving facts)."""
    shapes = [LayerShape(**layer) for layer in model["layers"]]
    facts = adapter_class(model["model_type"]).serving_notes(model["model_type"], shapes)
    if not facts:
        return ""
    return "## How to serve it\n\n" + "\n".join(f"- {fact}" for fact in facts)


# --- Markdown and YAML ------------------------------------------------------------------------------------


def _card(base_model: str | None, tags: list[str], sections: list[str]) -> str:
    """Front matter and body; sections that are empty are left out."""
    front = ["---"]
    if base_model is not None:
        front.append(f"base_model: {_yaml_scalar(base_model)}")
    front += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {_yaml_scalar(tag)}" for tag in tags]
    front.append("---")
    body = "\n\n".join(section for section in sections if section)
    return "\n".join(front) + "\n\n" + body + "\n"


def _tags(model: dict[str, Any], done: list[str]) -> list[str]:
    """staterank, the family's model_type, linear-attention, then what was done (each tag once)."""
    return list(dict.fromkeys(["staterank", model["model_type"], "linear-attention", *done]))


def _yaml_scalar(text: str) -> str:
    """TEXT as a YAML scalar: bare where YAML reads it back as that string, else double-quoted.

    JSON's string escapes are a subset of YAML's double-quoted ones, so ``json.dumps`` quotes safely:
    paths with ``:``, ``#``, leading digits or spaces, and words YAML would read as booleans or null.
    """
    if _PLAIN_YAML.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text, ensure_ascii=False)


def _table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    """A two-column Markdown table (``|`` inside a cell escaped)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"| {cell(header[0])} | {cell(header[1])} |", "| --- | --- |"]
    lines += [f"| {cell(key)} | {cell(value)} |" for key, value in rows]
    return "\n".join(lines)
