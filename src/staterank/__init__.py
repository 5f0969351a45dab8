"""staterank: analyse how linear-attention LLMs use their recurrent state, and compress them on that basis.

The public functions live in :mod:`staterank.api` and are re-exported here lazily. Importing the
package registers the ``staterank_*`` model types (per-layer head counts) with transformers.
"""

import warnings

# fla warns at import that Triton has no GPU here (transformers' Kimi Linear imports fla); staterank's CPU backend
# is the answer to that, so the line is noise (loading.prepare_runtime says the same for every model it loads).
warnings.filterwarnings("ignore", message="Triton is not supported on current platform")

from staterank.errors import StaterankError  # noqa: E402
from staterank.models.varheads import register_auto_classes  # noqa: E402

# Models pruned with per-layer head counts load through AutoModelForCausalLM once staterank is imported.
register_auto_classes()

__version__ = "0.1.0"

_API = ("analyze", "evaluate", "info", "load_model", "prune")


def __getattr__(name: str):
    if name in _API:
        from staterank import api

        return getattr(api, name)
    raise AttributeError(f"module 'staterank' has no attribute {name!r}")


__all__ = ["StaterankError", "__version__", *_API]
