"""Train the byte-level BPE tokenizer of the small models ``staterank train`` builds.

Byte-level BPE (as in GPT-2) needs no unknown token: every UTF-8 byte is in the base alphabet,
so any text round-trips exactly. One special token, ``<|endoftext|>``, separates documents and
serves as BOS, EOS and padding (as in GPT-2, text that spells it out is encoded as that token).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from staterank.data import read_documents
from staterank.errors import DataError, StaterankError

#: The one special token: document separator, BOS, EOS and padding.
ENDOFTEXT = "<|endoftext|>"

#: Fewest tokens that make sense: the 256 byte symbols plus the special token.
MIN_VOCAB_SIZE = 257


def train_tokenizer(data: str | Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on DATA.

    DATA is a data spec (see :mod:`staterank.data`) or an iterable of documents; all of it is used,
    so pass only training documents. Training is deterministic: the same documents in the same
    order give the same vocabulary and merges.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise StaterankError(f"vocab size {vocab_size} is too small: the least is {MIN_VOCAB_SIZE} (256 bytes + 1)")
    documents = [doc for doc in (read_documents(data) if isinstance(data, str) else data) if doc.strip()]
    if not documents:
        raise DataError(f"{data if isinstance(data, str) else 'the documents'}: no text to train a tokenizer on")

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text; use_regex splits words, digits and
    # punctuation apart first so merges never cross those boundaries (GPT-2's scheme).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return _wrap(tokenizer)


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """``tokenizer`` as a transformers tokenizer whose ``save_pretrained`` writes a loadable tokenizer.json."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        # The models are trained on documents joined by EOS with no BOS in front (see staterank.data),
        # so encoding adds no special tokens either.
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
