"""The tokenizer data is rendered and tokenized with (and the model is trained with)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(name_or_path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token and right padding.

    Llama 2 ships no pad token: like stack_llama_2 (``tokenizer.pad_token = tokenizer.eos_token``)
    we fall back to EOS, or UNK when there is no EOS. That is safe here because the scored tokens
    are the response tokens (`raydpo.data.collate`'s scoring index), never ``input_ids !=
    pad_token_id``, so a real EOS is still learned, and padding is never scored.
    """
    from transformers import AutoTokenizer

    from raydpo import storage_copy

    # a folder in run storage (the tiny model, a merged base, an adapter) is read from this node's
    # copy of its tokenizer files (a Ray Data task needs no 13 GB of weights to tokenize)
    tok = AutoTokenizer.from_pretrained(storage_copy.local_copy(name_or_path, only=storage_copy.is_tokenizer_file),
                                        revision=revision)
    if tok.pad_token_id is None:
        fallback = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer {name_or_path} has no pad, eos or unk token to pad with")
        tok.pad_token = fallback
    tok.padding_side = "right"
    return tok
