"""The tokenizer data is rendered and tokenized with (and the model is trained with)."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class BackendSpec:
    """A fast tokenizer as a tokenization task needs it: its Rust backend (the ``tokenizer.json``
    text of the tokenizer as transformers loaded it, post-processor updates included) and its
    special token ids. A task builds it with the ``tokenizers`` library in ~0.1 s instead of
    importing transformers (~3 s of every task worker's start). Only made when the backend alone
    encodes exactly as the tokenizer does (`portable`)."""

    backend_json: str
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    @property
    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(self.backend_json.encode()).hexdigest()


class BackendTokenizer:
    """What raydpo's tokenization calls of a tokenizer (`raydpo.data.tokenize`, `raydpo.data.packing`),
    on a `BackendSpec`: ``tokenizer(texts, add_special_tokens=...)["input_ids"]`` and the ids."""

    is_fast = True
    split_special_tokens = False

    def __init__(self, spec: BackendSpec):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_str(spec.backend_json)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = spec.bos_token_id, spec.eos_token_id, spec.pad_token_id

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        return {"input_ids": [e.ids for e in self.backend_tokenizer.encode_batch_fast(
            texts, add_special_tokens=add_special_tokens)]}


def portable(tok) -> BackendSpec | None:
    """``tok``'s `BackendSpec` when its Rust backend encodes exactly as ``tok(...)`` does: a fast
    tokenizer whose backend sets no truncation or padding and splits special tokens as it says
    (transformers then hands the whole encoding to the backend); else None."""
    if not getattr(tok, "is_fast", False):
        return None
    backend = tok.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens \
            or getattr(tok, "split_special_tokens", False):
        return None
    return BackendSpec(backend.to_str(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def task_tokenizer(name_or_path: str, revision: str | None = None) -> str | BackendSpec:
    """What a tokenization task is handed: the `BackendSpec` of the tokenizer (loaded here, on
    the driver, once per process) when it is `portable`, else its name, which the task loads with
    transformers."""
    from raydpo.data.tokenize import cached_tokenizer

    return portable(cached_tokenizer(name_or_path, revision)) or name_or_path
