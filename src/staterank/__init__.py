"""staterank: analyse how linear-attention LLMs use their recurrent state, and compress them on that basis.

The public functions live in :mod:`staterank.api` and are re-exported here lazily. Importing the
package registers the ``staterank_*`` model types (per-layer head counts) with transformers.
"""

from staterank.errors import StaterankError
from staterank.models.varheads import register_auto_classes

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
