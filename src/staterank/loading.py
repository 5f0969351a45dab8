"""Resolve MODEL (bundled name, local directory or hub id) and load it with its adapter."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from staterank.compat import warn_fla_generate
from staterank.errors import ModelLoadError, UnsupportedModelError
from staterank.models import ADAPTERS, ModelAdapter, adapter_for, supported_families

BUNDLED = ("tiny-deltanet", "tiny-gated-deltanet", "mqar-deltanet", "mqar-gated-deltanet")


@dataclass
class LoadedModel:
    """A model, its tokenizer, its adapter and the local directory it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    path: Path


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("staterank") / "bundled" / name))


def resolve(model: str | os.PathLike) -> Path:
    """The local directory of MODEL, downloading a hub id into the HF cache if the network allows."""
    text = str(model)
    if text in BUNDLED:
        return bundled_path(text)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{path}: not a directory (MODEL is a model directory, a hub id or {', '.join(BUNDLED)})"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a model directory (no config.json)")
        return path.resolve()
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise ModelLoadError(
            f"{text}: no such model directory, and not a hub id or bundled model ({', '.join(BUNDLED)})"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]))
    except Exception as e:  # hub errors come in many types: offline, gated, missing
        raise ModelLoadError(
            f"model {text!r} is not available locally and could not be downloaded ({type(e).__name__}); "
            "download it where there is network and pass its local directory"
        ) from None


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path / 'config.json'}: corrupt config ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{path / 'config.json'}: no model_type")
    return config


def prepare_runtime(model_type: str) -> None:
    """Make a family loadable and runnable here: register fla's classes, route CPU work to PyTorch."""
    # fla warns at import that Triton has no GPU here; staterank's CPU backend is the answer to that.
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {supported_families()}"
        )
    if ADAPTERS[model_type].requires_fla:
        try:
            import fla  # noqa: F401  (registers the fla model classes with the Auto classes)
        except ImportError:
            raise ModelLoadError(
                f"{model_type} models need flash-linear-attention: pip install 'staterank[fla]'"
            ) from None
    from staterank import backends
    from staterank.backends.hf_fallbacks import use_torch_fallbacks_on_cpu

    try:
        backends.install()
    except ValueError as error:  # a bad STATERANK_TORCH_KERNELS
        raise ModelLoadError(f"STATERANK_TORCH_KERNELS: {error}") from None
    use_torch_fallbacks_on_cpu()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(
    model: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load MODEL for inference: float32 on CPU, bfloat16 on GPU unless ``dtype`` says otherwise.

    ``device_map`` (``"auto"``, or a dict as accelerate takes it) spreads the layers over the GPUs
    with accelerate's big-model inference, for models larger than one GPU; ``device`` must then be
    None. Every layer must fit on a device: offloading to CPU or disk is refused.
    """
    path = resolve(model)
    config = read_config(path)
    prepare_runtime(config["model_type"])
    transformers_logging.disable_progress_bar()  # one line per shard on stderr is noise for a CLI
    if device_map is not None and device is not None:
        raise ModelLoadError("--device and --device-map exclude each other: the device map places the layers")
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    placement = {} if device_map is None else {"device_map": device_map}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, **placement
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: cannot load the model ({first_line})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({e})") from None
    if device_map is None:
        loaded.to(device)
    else:
        offloaded = sum(p.numel() for p in loaded.parameters() if p.device.type == "meta")
        if offloaded:
            # accelerate keeps offloaded weights off the module until the module is called; fla's fused
            # MLP and the feature taps read weights of modules they do not call, so those runs would be wrong.
            raise ModelLoadError(
                f"{path}: the device map offloads {offloaded:,} parameters to CPU or disk, which staterank does "
                "not support; use more GPUs or a smaller dtype so that every layer sits on a device"
            )
    loaded.eval()
    if ADAPTERS[config["model_type"]].requires_fla:
        warn_fla_generate(type(loaded))
    return LoadedModel(loaded, tokenizer, adapter_for(loaded), path)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids go: the model's device, or with a device map the input embeddings' (accelerate moves them on)."""
    if getattr(model, "hf_device_map", None) is None:
        return next(model.parameters()).device
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device
