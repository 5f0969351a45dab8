"""Option checks at the boundary: bad input is refused in one line before any model is loaded.

Each rule (``positive_int``, ``fraction``, ...) is both an argparse ``type`` (it parses the text and
raises :class:`argparse.ArgumentTypeError`) and, through :meth:`Rule.check`, the API's check of the
same value (it raises :class:`OptionError`). Numbers must be finite: NaN and infinity are refused.
:func:`check_output_path` refuses an output that cannot be created; :func:`staterank.io.check_output`
calls it, so every writer does.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from staterank.errors import StaterankError


class OptionError(StaterankError):
    """An option whose value means nothing: zero steps, a negative learning rate, a NaN temperature."""


class OutputPathError(StaterankError):
    """An output that cannot be created: a file stands where a directory must be, or no permission to write."""


@dataclass(frozen=True)
class Rule:
    """A kind of number (int or float) and the values of it that mean something."""

    kind: type
    expected: str  # completes "expected ...", e.g. "an integer >= 1"
    holds: Callable[[float], bool]

    def accepts(self, value: object) -> bool:
        """Whether ``value`` is a finite number of this kind (an int for an int rule; no bool) that holds."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        return math.isfinite(value) and self.holds(value)

    def __call__(self, text: str) -> int | float:
        """The argparse type: TEXT parsed and checked."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}") from None
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text}")
        return value

    def check(self, name: str, value: object, optional: bool = False) -> None:
        """The API's check of ``value``, given for the option ``name``; None passes where it is ``optional``."""
        if not (self.accepts(value) or (optional and value is None)):
            raise OptionError(f"{name} must be {self.expected}, got {value!r}")


def int_at_least(minimum: int) -> Rule:
    """Integers from ``minimum`` up."""
    return Rule(int, f"an integer >= {minimum}", lambda value: value >= minimum)


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
sequence_length = int_at_least(2)  # a sequence that is scored predicts its tokens after the first
random_seed = Rule(int, "an integer between -2**32 and 2**32", lambda value: abs(value) < 2**32)
positive_float = Rule(float, "a finite number > 0", lambda value: value > 0)
non_negative_float = Rule(float, "a finite number >= 0", lambda value: value >= 0)
fraction = Rule(float, "a number in [0, 1)", lambda value: 0 <= value < 1)
probability = Rule(float, "a number in [0, 1]", lambda value: 0 <= value <= 1)
open_unit = Rule(float, "a number in (0, 1)", lambda value: 0 < value < 1)


def _int_list(text: str, allow_empty: bool) -> list[int]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    expected = "comma-separated integers >= 1" + (" (or nothing)" if allow_empty else "")
    if not items and not allow_empty:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    try:
        return [positive_int(item) for item in items]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_ints(text: str) -> list[int]:
    """The argparse type of a non-empty list such as ``--positions 64,256,1024``."""
    return _int_list(text, allow_empty=False)


def positive_ints_or_none(text: str) -> list[int]:
    """The argparse type of a list that may be empty, such as ``--decode-batch-sizes ''``."""
    return _int_list(text, allow_empty=True)


def device(text: str) -> str:
    """The argparse type of ``--device``: a device torch knows, and for CUDA one this machine has."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU (use --device cpu)")
        if parsed.index is not None and parsed.index >= count:
            last = f"cuda:{count - 1}"
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA GPU(s), cuda:0 to {last}")
    return text


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output that cannot be created; return the path.

    The nearest ancestor of ``path`` that exists must be a directory this process may write in
    (``path`` itself is written beside a temporary file or directory in its parent).
    """
    path = Path(path)
    for ancestor in path.parents:  # nearest first
        try:
            if not ancestor.exists():
                continue
        except PermissionError:  # a directory above it may not be searched
            raise OutputPathError(f"{path}: no permission to look inside {ancestor.parent}") from None
        if not ancestor.is_dir():
            raise OutputPathError(f"{path}: {ancestor} is a file, not a directory; choose another output path")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputPathError(f"{path}: no permission to write in {ancestor}; choose another output path")
        break
    return path
