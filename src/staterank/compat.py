"""Checks of installed third-party combinations that are known to compute something wrong.

Each check inspects the installed code (a signature, an attribute), not version numbers, so it is
right for releases we have not seen; the version numbers only go into the message.
"""

from __future__ import annotations

import inspect
import warnings
from importlib import metadata

from staterank.errors import StaterankWarning

#: The pin that avoids the generate() problem below (kept in step with pyproject.toml's upper bound).
TRANSFORMERS_PIN = "transformers<5.24"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(unknown version)"


def fla_generate_problem(model_class: type) -> str | None:
    """Why ``model_class.generate()`` decodes without its recurrent state here, or None if it does not.

    transformers 5.24 renamed the cache argument that ``generate()`` hands to the model's forward from
    ``past_key_values`` to ``cache``. A forward that takes only ``past_key_values`` (fla 0.6.0's) then
    receives ``cache`` among its ignored keyword arguments and runs every step from an empty state.
    """
    from transformers.generation import GenerationMixin

    passes = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    takes = inspect.signature(model_class.forward).parameters
    if "cache" not in passes or "cache" in takes or "past_key_values" not in takes:
        return None
    return (
        f"transformers {_version('transformers')} passes generate()'s cache as `cache`, which "
        f"flash-linear-attention {_version('flash-linear-attention')}'s {model_class.__name__} ignores, so its "
        f"generate() decodes without its state (staterank's own commands are unaffected); pip install "
        f"'{TRANSFORMERS_PIN}'"
    )


def warn_fla_generate(model_class: type) -> None:
    """Warn once (one line in the CLI) when ``fla_generate_problem`` finds the broken combination."""
    problem = fla_generate_problem(model_class)
    if problem is not None:
        warnings.warn(problem, StaterankWarning, stacklevel=2)
