"""staterank: analyse how linear-attention LLMs use their recurrent state, and compress them on that basis."""

from staterank.api import evaluate, info, load_model
from staterank.errors import StaterankError

__version__ = "0.1.0"

__all__ = ["StaterankError", "__version__", "evaluate", "info", "load_model"]
