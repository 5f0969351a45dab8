"""staterank: analyse how linear-attention LLMs use their recurrent state, and compress them on that basis.

The public functions live in :mod:`staterank.api` and are re-exported here lazily, so that
``import staterank`` (and ``staterank --help``) stays quick: torch and transformers load on first use.
"""

from staterank.errors import StaterankError

__version__ = "0.1.0"

_API = ("analyze", "evaluate", "info", "load_model", "prune")


def __getattr__(name: str):
    if name in _API:
        from staterank import api

        return getattr(api, name)
    raise AttributeError(f"module 'staterank' has no attribute {name!r}")


__all__ = ["StaterankError", "__version__", *_API]
