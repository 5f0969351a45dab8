"""Data of the ``staterank_techdocs_lastword`` lm-eval task: predict the last word of a techdocs-val paragraph.

``techdocs_lastword.jsonl`` beside this file is ``build_items()`` written one JSON object a line;
regenerate it with ``python -m staterank.lm_eval_tasks.techdocs_lastword``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA_FILE = Path(__file__).with_name("techdocs_lastword.jsonl")

#: A prose paragraph: words, spaces and light punctuation only, ending in a word of 4+ letters and a full stop.
_PROSE = re.compile(r"[A-Za-z][A-Za-z ,;'()-]+ [a-z]{4,}\.")


def build_items(count: int = 40, min_words: int = 20, max_words: int = 80) -> list[dict]:
    """The first ``count`` prose paragraphs of techdocs-val as {"text": paragraph without its full stop}."""
    from staterank.data import read_documents

    items = []
    for doc in read_documents("techdocs-val"):
        for paragraph in re.split(r"\n\s*\n", doc):
            text = " ".join(paragraph.split())
            if _PROSE.fullmatch(text) and min_words <= len(text.split()) <= max_words:
                items.append({"text": text[:-1]})
                if len(items) == count:
                    return items
    return items


def load(**_metadata):
    """The task's dataset ({"test": rows}), read from the JSONL file beside this module (lm-eval ``custom_dataset``)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA_FILE)})


if __name__ == "__main__":
    DATA_FILE.write_text("".join(json.dumps(item) + "\n" for item in build_items()))
