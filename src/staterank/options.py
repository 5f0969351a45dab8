"""The options of every command: one dataclass each, whose fields carry the default, the help and the check.

The CLI builds its arguments from these classes (:func:`add_arguments`) and the API takes them, so a
default or a rule is written once. Constructing an options object checks every field
(``__post_init__``), so the API refuses a bad value before any work, in the same words as the CLI.

    opts = PruneOptions(method="rrqr", ratio=0.5, data="techdocs")
    staterank.api.prune("tiny-deltanet", opts.method, opts.ratio, "runs/rrqr-50", opts)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from staterank.validate import (
    OptionError,
    Rule,
    device,
    fraction,
    non_negative_float,
    non_negative_int,
    open_unit,
    positive_float,
    positive_int,
    positive_ints,
    positive_ints_or_none,
    probability,
    random_seed,
    sequence_length,
)


def option(
    default: Any,
    help: str,
    rule: Rule | None = None,
    *,
    flag: str | None = "",
    parse: Callable[[str], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    required: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field of an options class.

    ``rule`` checks the value (the API) and parses it (the CLI); ``parse`` parses CLI text where the
    rule does not (a list, a device). ``flag`` is the CLI's name ("" for ``--field-name``, None for an
    option the CLI does not offer). A bool default makes a ``store_true`` flag.
    """
    spec = dict(help=help, rule=rule, flag=flag, parse=parse, choices=choices, required=required, metavar=metavar)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=spec)
    return field(default=default, metadata=spec)


def _flag(f: dataclasses.Field) -> str | None:
    flag = f.metadata.get("flag", "")
    return None if flag is None else flag or "--" + f.name.replace("_", "-")


OptionsT = TypeVar("OptionsT", bound="Options")


@dataclass
class Options:
    """Checks every field against its rule when constructed; None passes where the default is None."""

    #: the command these options belong to (for messages)
    command: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            rule = f.metadata.get("rule")
            if rule is not None:  # named as the API calls it; the CLI's argparse types say the flag
                rule.check(f.name, value, optional=f.default is None)
            choices = f.metadata.get("choices")
            if choices and value not in choices and not (value is None and f.default is None):
                raise OptionError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")

    def replace(self, **changes: Any) -> Options:
        """A copy with some fields changed (and checked again); an unknown field is refused with the known ones."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            known = ", ".join(f.name for f in fields(self))
            owner = self.command or type(self).__name__
            raise OptionError(f"{owner}: no option {', '.join(unknown)} (options: {known})")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra: Any) -> Options:
        """The options object of a parsed command line (fields the CLI does not offer keep their default)."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if _flag(f) and hasattr(args, f.name)}
        return cls(**given, **extra)


def resolve(cls: type[OptionsT], opts: OptionsT | None, overrides: dict[str, Any], **given: Any) -> OptionsT:
    """The options an API function runs with: ``opts`` (or the defaults) with ``overrides`` and the
    arguments ``given`` positionally (where not None) applied, every field checked."""
    base = cls() if opts is None else opts
    if not isinstance(base, cls):
        raise OptionError(f"expected {cls.__name__}, got {type(base).__name__}")
    changes = {**{name: value for name, value in given.items() if value is not None}, **overrides}
    return base.replace(**changes) if changes else base


def add_arguments(parser: argparse.ArgumentParser, cls: type[Options]) -> None:
    """Add one CLI argument per field of ``cls`` that has a flag: its type, default and help from the field."""
    for f in fields(cls):
        flag = _flag(f)
        if flag is None:
            continue
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = meta["help"]
        if default not in (None, False, "", [], {}) and "default" not in help_text:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text.replace("%", "%%")}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["default"] = default
            kwargs["type"] = meta["parse"] or meta["rule"] or None
            if meta["choices"]:
                kwargs["choices"] = list(meta["choices"])
            if meta["required"]:
                kwargs["required"] = True
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
        if kwargs.get("type") is None:
            kwargs.pop("type", None)
        parser.add_argument(flag, **kwargs)


def comma_list(text: str) -> list[str]:
    """``a, b,c`` -> ["a", "b", "c"] (empty items dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


# --- shared groups ---------------------------------------------------------------------------------


@dataclass
class Common(Options):
    seed: int = option(0, "random seed", random_seed)
    progress: bool = option(True, "show progress bars", flag=None)


@dataclass
class Loading(Common):
    """How MODEL is loaded."""

    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available)", parse=device)
    device_map: str | None = option(
        None,
        "spread a model larger than one GPU over all GPUs with accelerate (no CPU or disk offload)",
        choices=("auto", "balanced", "sequential"),
    )
    trust_remote_code: bool = option(False, "allow a hub model's own code to run (off by default)")
    dtype: Any = option(None, "a torch dtype (default: float32 on CPU, bfloat16 on GPU)", flag=None)

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`staterank.api.load_model` these options set."""
        return {name: getattr(self, name) for name in ("device", "device_map", "trust_remote_code", "dtype")}


# --- one class per command ------------------------------------------------------------------------

MICRO_BATCH_HELP = "split each step's batch into forward passes of this many sequences (gradient accumulation)"


@dataclass
class InfoOptions(Loading):
    command: ClassVar[str] = "info"
    json: bool = option(False, "print JSON instead of a table")


@dataclass
class EvaluateOptions(Loading):
    command: ClassVar[str] = "evaluate"
    data: str | None = option(None, "corpus: file, directory, hf:NAME or a shipped name (wikitext-test)")
    tasks: list[str] = option(
        ["ppl"], "comma-separated: ppl, ppl-by-position, recall, mqar, lm-eval:TASK[,TASK]", parse=comma_list
    )
    mqar_pairs: int | None = option(None, "mqar: key-value pairs per example (default: the model's training)",
                                    positive_int)  # fmt: skip
    mqar_seq_len: int | None = option(None, "mqar: tokens per example (default: the model's training)", positive_int)
    mqar_examples: int = option(1000, "mqar: examples to score", positive_int)
    stride: int | None = option(None, "ppl: sliding windows moving by this many tokens", positive_int)
    lm_eval_limit: int | None = option(None, "lm-eval: at most this many examples per task", positive_int)
    seq_len: int = option(512, "window length in tokens", sequence_length)
    max_tokens: int | None = option(None, "read at most this many tokens of the corpus", positive_int)
    batch_size: int = option(8, "windows per forward pass", positive_int)
    out: str | None = option(None, "write the results as JSON here")
    overwrite: bool = option(False, "replace an existing --out")


@dataclass
class AnalyzeOptions(Loading):
    command: ClassVar[str] = "analyze"
    samples: int = option(8, "sequences per corpus", positive_int)
    seq_len: int = option(2048, "tokens per sequence", positive_int)
    positions: list[int] | None = option(
        None,
        "comma-separated token counts at which to read the states (default: log-spaced, and the last)",
        parse=positive_ints,
    )
    eps: float = option(1e-4, "effective rank counts singular values > eps * largest", open_unit)
    batch_size: int = option(1, "sequences per forward pass", positive_int)
    kernels: str = option(
        "torch",
        "the forward's kernels on a GPU for fla's models: torch (staterank's PyTorch ones, nothing to compile) or "
        "fla (fla's Triton ones: faster per sample, after one to two minutes of compiling on a fresh machine); "
        "transformers' hybrids keep the kernels transformers chose",
        choices=("torch", "fla"),
    )
    overwrite: bool = option(False, "replace an existing --out")


@dataclass
class PruneOptions(Loading):
    command: ClassVar[str] = "prune"
    method: str = option("", "one of the methods listed above", required=True)
    ratio: float = option(0.0, "fraction of q/k channels per head (or of heads) removed, in [0, 1)", fraction,
                          required=True)  # fmt: skip
    data: str | None = option(None, "calibration corpus (methods that read activations or states need one)")
    calib_tokens: int = option(32768, "calibration tokens (default: 16 x 2048)", positive_int)
    seq_len: int = option(2048, "calibration sequence length", positive_int)
    batch_size: int = option(4, "calibration sequences per forward pass", positive_int)
    align: int | None = option(
        None, "round the kept d_k down to a multiple of this (default: 16, else 8, where that costs at most 5% of d_k)",
        positive_int,
    )  # fmt: skip
    alpha: float = option(0.5, "jrnp: weight of the rank in the Saturation Score", probability)
    scope: str = option("layer", "head methods: where to count", choices=("layer", "global"))
    unit: str = option(
        "auto",
        "head methods with grouped value heads: remove value heads, or key heads with all their value heads "
        "(default: auto, whichever comes closer to --ratio)",
        choices=("auto", "value", "key"),
    )
    options: dict[str, Any] = option({}, "method options, e.g. {'f': 2.0} (the CLI's --option KEY=VALUE)", flag=None)
    overwrite: bool = option(False, "replace an existing --out")


@dataclass
class FinetuneOptions(Common):
    command: ClassVar[str] = "finetune"
    teacher: str | None = option(None, "distil from this model (the unpruned original)")
    kd_temp: float = option(2.0, "distillation temperature", positive_float)
    kd_weight: float = option(0.5, "weight of the distillation term", probability)
    lora_rank: int = option(32, "LoRA rank", positive_int)
    lora_alpha: float = option(64, "LoRA alpha (the update is scaled by alpha / rank)", positive_float)
    lora_dropout: float = option(0.0, "LoRA dropout", fraction, flag=None)
    lora_targets: list[str] | None = option(
        None, "comma-separated module names (default: the model family's q, k, v projections)", parse=comma_list
    )
    steps: int = option(200, "optimizer steps", positive_int)
    batch_size: int = option(8, "sequences per step", positive_int)
    micro_batch_size: int | None = option(None, MICRO_BATCH_HELP, positive_int)
    grad_accum: int | None = option(
        None, "forward passes per step on each rank, their gradients added (gradient accumulation)", positive_int
    )
    grad_checkpointing: bool = option(False, "recompute each layer's activations in the backward pass")
    parallel: str = option(
        "ddp",
        "under torchrun / accelerate launch: ddp (a replica of the model on every rank) or fsdp (the frozen base "
        "and the LoRA weights sharded over the ranks with FSDP2; also in one process)",
        choices=("ddp", "fsdp"),
    )
    seq_len: int = option(512, "tokens per sequence", sequence_length)
    lr: float = option(1e-4, "peak learning rate", positive_float)
    warmup_steps: int = option(20, "linear warmup steps", non_negative_int, flag=None)
    min_lr_ratio: float = option(0.1, "the cosine decays to this fraction of lr", probability, flag=None)
    grad_clip: float = option(1.0, "gradient-norm clip", positive_float)
    save_every: int = option(50, "checkpoint every N steps (0: only at the end)", non_negative_int)
    max_train_tokens: int | None = option(None, "use at most this many tokens of the corpus", positive_int, flag=None)
    stop_after: int | None = option(None, "stop (resumably) after this many steps", positive_int, flag=None)
    resume: bool = option(False, "continue from OUT's last checkpoint")
    overwrite: bool = option(False, "replace an existing --out")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available)", parse=device)
    device_map: str | None = option(
        None,
        "one process, the model's layers spread over all GPUs with accelerate (model-parallel; not under torchrun)",
        choices=("auto", "balanced", "sequential"),
    )

    #: options that define the trajectory of a run: a resume must not change them
    RUN_DEFINING: ClassVar[tuple[str, ...]] = (
        "teacher", "kd_temp", "kd_weight", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "steps",
        "batch_size", "seq_len", "lr", "warmup_steps", "min_lr_ratio", "grad_clip", "seed", "max_train_tokens",
    )  # fmt: skip


@dataclass
class TrainOptions(Options):
    """Pretraining. The config file's "train" section may set any field; the CLI's flags override it.

    Every field defaults to None, meaning "the config's section, else :data:`TRAIN_DEFAULTS`".
    """

    command: ClassVar[str] = "train"
    steps: int | None = option(None, "optimizer steps (default: 1000)", positive_int)
    batch_size: int | None = option(None, "sequences per step (default: 32)", positive_int)
    micro_batch_size: int | None = option(None, MICRO_BATCH_HELP, positive_int)
    seq_len: int | None = option(None, "tokens per sequence (default: 512)", sequence_length)
    lr: float | None = option(None, "peak learning rate (default: 3e-3)", positive_float)
    warmup_steps: int | None = option(None, "linear warmup steps (default: 100)", non_negative_int, flag=None)
    min_lr_ratio: float | None = option(None, "the cosine decays to this fraction of lr", probability, flag=None)
    weight_decay: float | None = option(None, "AdamW weight decay of the matrices", non_negative_float, flag=None)
    grad_clip: float | None = option(None, "gradient-norm clip", positive_float, flag=None)
    val_data: str | None = option(None, "validation corpus for periodic perplexity")
    val_every: int | None = option(None, "validate every N steps (0: at the end only)", non_negative_int, flag=None)
    val_tokens: int | None = option(None, "the first this many tokens of --val-data", positive_int, flag=None)
    save_every: int | None = option(None, "checkpoint every N steps (0: only when stopped early)", non_negative_int,
                                    flag=None)  # fmt: skip
    seed: int | None = option(None, "random seed (default: the config's, else 0)", random_seed)
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available)", parse=device)
    tokenizer: str | None = option(None, "existing tokenizer directory (default: train one on --data)")
    vocab_size: int | None = option(None, "size of a tokenizer trained here (default: the config's, else 4096)",
                                    positive_int, flag=None)  # fmt: skip
    max_train_tokens: int | None = option(None, "use at most this many tokens of the corpus", positive_int, flag=None)
    task: dict | None = option(None, "a synthetic task instead of a corpus: {\"name\": \"mqar\", ...}", flag=None)
    save_dtype: str | None = option(None, "dtype of the saved weights", choices=("float32", "bfloat16"),
                                    flag=None)  # fmt: skip
    stop_after: int | None = option(None, "stop (resumably) after this many steps", positive_int, flag=None)
    resume: bool = option(False, "continue from OUT's checkpoint")
    overwrite: bool = option(False, "replace an existing --out")
    progress: bool = option(True, "show progress bars", flag=None)

    def resolved(self, section: dict[str, Any]) -> dict[str, Any]:
        """Every run option: these fields where set, else the config's "train" section, else the default."""
        unknown = sorted(set(section) - set(TRAIN_DEFAULTS))
        if unknown:
            raise OptionError(f"unknown option(s) in the config's \"train\" section: {', '.join(unknown)}")
        merged = {**TRAIN_DEFAULTS, **section}
        merged.update({name: getattr(self, name) for name in TRAIN_DEFAULTS if getattr(self, name) is not None})
        TrainOptions(**{k: v for k, v in merged.items() if k in TRAIN_DEFAULTS})  # the section's values checked too
        return merged


#: The values a TrainOptions field left at None takes when the config's "train" section does not set it.
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 32,
    "micro_batch_size": None,
    "seq_len": 512,
    "lr": 3e-3,
    "warmup_steps": 100,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "val_data": None,
    "val_every": 250,
    "val_tokens": 262_144,
    "save_every": 500,
    "seed": 0,
    "device": None,
    "tokenizer": None,
    "vocab_size": None,
    "max_train_tokens": None,
    "task": None,
    "save_dtype": "float32",
}


@dataclass
class BenchOptions(Common):
    command: ClassVar[str] = "bench"
    from_config: bool = option(False, "MODELs are configs: random weights, published shapes")
    batch_size: int = option(8, "prefill batch", positive_int)
    seq_len: int = option(2048, "prefill tokens per sequence", positive_int)
    decode_batch_sizes: list[int] = option(
        [1, 64], "comma-separated decode batch sizes (default: 1,64); empty for prefill only",
        parse=positive_ints_or_none,
    )  # fmt: skip
    decode_steps: int = option(32, "decoded tokens per timing", positive_int)
    dtype: str | None = option(
        None, "float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)",
        choices=("float32", "bfloat16", "float16"),
    )  # fmt: skip
    warmup: int = option(1, "untimed runs first", non_negative_int)
    repeats: int = option(5, "timed runs (medians reported)", positive_int)
    memory_budget_gib: float | None = option(
        None, "report the largest batch whose states fit beside the weights", positive_float
    )
    sequential: bool = option(
        False,
        "load, measure and free one model at a time (models too large to share the device; not interleaved); "
        "until the last is measured, the others are kept in OUT's .partial file",
    )
    compile: bool = option(
        False, "graphed decoding replays each model's step compiled by torch.compile (minutes of compiling first)"
    )
    overwrite: bool = option(False, "replace an existing --out")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available)", parse=device)


@dataclass
class ReportOptions(Common):
    command: ClassVar[str] = "report"


@dataclass
class DemoOptions(Common):
    command: ClassVar[str] = "demo"
    model: str = option("tiny-deltanet", "the bundled model the demo runs on")
    device: str = option("cpu", "where the demo runs", parse=device)
