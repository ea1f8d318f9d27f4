"""Tokenization for SFT (packed blocks) and DPO (prompt / chosen / rejected ids): pure functions
over lists, wrapped by batch functions that Ray Data's ``map_batches`` runs as tasks. A task
worker process loads each tokenizer once (`cached_tokenizer`) and Ray reuses its task workers,
so every later batch, split and dataset of the same driver tokenizes without starting a process
(an actor pool starts new processes, and loads the tokenizer again, for every execution).

DPO. ``prompt_input_ids`` = BOS + prompt (the tokenizer's own special tokens);
``chosen_input_ids`` / ``rejected_input_ids`` = response tokens + EOS, no BOS. Prompt and response
are encoded *together* and split at the prompt's tokens (as TRL 1.x does), so a pair's prompt +
response ids are exactly the encoding of prompt + response text: the context SFT trained on and
generation continues. Encoding them apart would not be: a SentencePiece tokenizer (Llama 2) ends
``"...Answer: "`` alone with a lone ``▁`` token, while ``"...Answer: Word"`` gives ``▁Word``; a
byte-level BPE does the same with ``Ġ``; and tokens can merge across the boundary (a prompt ending
mid-word). The split: the prompt alone is encoded too, and the prompt part is the longest common
prefix of it with *both* joint encodings (`_split_joint`). It usually drops the prompt's last
token (the lone ``▁``), or those that merge with a response's first characters. Taking the
shorter of the two prefixes keeps one prompt for chosen and rejected (DPO compares two responses
to one context): a response whose encoding agreed with the prompt's further simply starts with
those prompt tokens, and prompt + response still equals its joint encoding. Nothing is dropped
or counted for a mismatch: the joint encoding is the truth, the prompt alone only finds the cut.
Truncation, in tokens, TRL's order: if prompt + longer response > ``max_length``, the prompt
keeps BOS and its *last* ``max_prompt_length - 1`` tokens (the question's end and the
"Answer:" frame matter most); if still too long, both responses are cut to
``max_length - len(prompt)``. A cut response loses its EOS — it did not end, and the model
must not learn that it did — by the same rule for chosen and rejected. Such pairs are flagged
``truncated``.

Templated rows (rendered by a chat template, `raydpo.data.rows.Pair.templated`) carry their own
special tokens: they are tokenized as they are, with no BOS or EOS added — TRL's
``add_special_tokens=False`` for chat-templated text, and no EOS where the template ends a turn its
own way. Their truncation follows the same rule (BOS kept when the text begins with it).

SFT. Each example is BOS + prompt + chosen + EOS (templated: prompt + chosen as they are); the
examples of one Ray Data batch are concatenated and cut into ``block_size`` blocks (column
``input_ids``). The tail of each batch shorter than a block is dropped: at most
``block_size - 1`` tokens per batch of ``tokenize_batch_size`` rows, and a batch holding fewer
tokens than one block yields nothing.
"""

from __future__ import annotations

import functools
from typing import Any

# the ids are a function of the text, the tokenizer *and this code*: caches of anything computed
# from them (the precomputed reference) key on it. 2: DPO pairs split from joint encodings.
TOKENIZE_VERSION = 2


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  max_prompt_length: int, bos_id: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """Returns ``(prompt, chosen, rejected, truncated)`` with ``len(prompt) + len(longer) <= max_length``."""
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected, False
    if len(prompt) > max_prompt_length:
        if bos_id is not None and prompt and prompt[0] == bos_id:
            keep = max_prompt_length - 1
            prompt = [bos_id] + (prompt[-keep:] if keep > 0 else [])
        else:
            prompt = prompt[-max_prompt_length:]
    budget = max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget], True


def _encode(tokenizer, texts: list[str], special: list[bool]) -> list[list[int]]:
    """Token ids of ``texts``, each with the tokenizer's special tokens where ``special`` says so
    (two batched calls at most)."""
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        idx = [i for i, s in enumerate(special) if s is flag]
        if idx:
            for i, ids in zip(idx, batch_ids(tokenizer, [texts[i] for i in idx], flag)):
                out[i] = ids
    return out


def batch_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=...)["input_ids"]``, through the Rust backend's batch
    call that computes no character offsets when nothing else differs (no truncation or padding set
    on the backend, special tokens split as the tokenizer says): the same ids without the offsets'
    cost, which pays for most of encoding each DPO prompt three times."""
    if tokenizer.is_fast:
        backend = tokenizer.backend_tokenizer
        if backend.truncation is None and backend.padding is None \
                and backend.encode_special_tokens == tokenizer.split_special_tokens:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share (list slices compare in C: a binary search over
    them beats a Python loop over a prompt's hundreds of ids)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def _split_joint(prompt: list[int], joint_c: list[int], joint_r: list[int]) -> tuple[list[int], list[int], list[int]]:
    """``(prompt, chosen, rejected)`` ids from the joint encodings of prompt + each response:
    the prompt is their longest common prefix with the prompt's own encoding, one for both."""
    n = min(common_prefix_length(prompt, joint_c), common_prefix_length(prompt, joint_r))
    return joint_c[:n], joint_c[n:], joint_r[n:]


def tokenize_dpo(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str], max_length: int,
                 max_prompt_length: int, templated: list[bool] | None = None) -> dict[str, list[Any]]:
    """Lists of ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (lists of int)
    and ``truncated`` (bool), one per pair, and its stable ``row_id`` (`raydpo.data.order`).
    ``templated`` (default: none) marks chat-templated pairs, which get no BOS or EOS added."""
    from raydpo.data.order import row_id

    out: dict[str, list[Any]] = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [],
                                 "truncated": [], "row_id": []}
    if not prompts:  # an empty split (HF fast tokenizers fail on an empty list)
        return out
    templated = templated or [False] * len(prompts)
    n, eos = len(prompts), tokenizer.eos_token_id
    # one batch of prompts, prompts + chosen, prompts + rejected: the tokenizer's batch call is the cost
    ids = _encode(tokenizer, prompts + [p + c for p, c in zip(prompts, chosen)]
                  + [p + r for p, r in zip(prompts, rejected)], [not t for t in templated] * 3)
    for p, jc, jr, t in zip(ids[:n], ids[n:2 * n], ids[2 * n:], templated):
        end = [] if t else [eos]
        p, c, r = _split_joint(p, jc, jr)
        p, c, r, cut = truncate_pair(p, c + end, r + end, max_length, max_prompt_length, tokenizer.bos_token_id)
        out["prompt_input_ids"].append(p)
        out["chosen_input_ids"].append(c)
        out["rejected_input_ids"].append(r)
        out["truncated"].append(cut)
    out["row_id"] = [row_id(*t) for t in zip(prompts, chosen, rejected)]
    return out


def sft_examples(tokenizer, texts: list[str], templated: list[bool] | None = None) -> list[list[int]]:
    """BOS + text + EOS per SFT example (a ``templated`` text as it is, no special tokens added)."""
    templated = templated or [False] * len(texts)
    eos = tokenizer.eos_token_id
    return [ids + ([] if t else [eos]) for ids, t in zip(_encode(tokenizer, texts, [not t for t in templated]),
                                                          templated)]


def pack_sft(tokenizer, texts: list[str], block_size: int, templated: list[bool] | None = None) -> list[list[int]]:
    """`sft_examples` concatenated and cut into ``block_size`` blocks; the tail shorter than a
    block is dropped (`raydpo.data.packing.pack_chunk`)."""
    from raydpo.data.packing import pack_chunk

    return pack_chunk(sft_examples(tokenizer, texts, templated), block_size) if texts else []


def templated(batch) -> list[bool] | None:
    """A pyarrow batch's ``templated`` column (None when it has none: plain text)."""
    return batch["templated"].to_pylist() if "templated" in batch.column_names else None


def cached_tokenizer(name_or_path, revision: str | None = None):
    """A task's tokenizer, loaded once per process: a `raydpo.data.tokenizer.BackendSpec`'s
    backend (keyed on its content), or `raydpo.data.tokenizer.load_tokenizer` of a name (the key
    holds a local folder's file times, so a tokenizer rewritten in place is loaded again)."""
    from pathlib import Path

    from raydpo.data.tokenizer import BackendSpec

    if isinstance(name_or_path, BackendSpec):
        return _backend_once(name_or_path.digest, name_or_path)
    folder = Path(name_or_path)
    stamp = tuple(sorted((f.name, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())) \
        if folder.is_dir() else ()
    return _load_once(name_or_path, revision, stamp)


@functools.lru_cache(maxsize=4)
def _backend_once(digest: str, spec):
    from raydpo.data.tokenizer import BackendTokenizer

    return BackendTokenizer(spec)


@functools.lru_cache(maxsize=4)
def _load_once(name_or_path: str, revision: str | None, stamp: tuple):
    from raydpo.data.tokenizer import load_tokenizer

    return load_tokenizer(name_or_path, revision=revision)


def dpo_batch(batch, *, tokenizer, max_length: int, max_prompt_length: int, revision: str | None = None):
    """Ray Data batch function: formatted rows → prompt/chosen/rejected token ids (pyarrow table)."""
    import pyarrow as pa

    out = tokenize_dpo(cached_tokenizer(tokenizer, revision), batch["prompt"].to_pylist(),
                       batch["chosen"].to_pylist(), batch["rejected"].to_pylist(), max_length, max_prompt_length,
                       templated(batch))
    ids = pa.list_(pa.int32())
    return pa.table({
        "prompt_input_ids": pa.array(out["prompt_input_ids"], type=ids),
        "chosen_input_ids": pa.array(out["chosen_input_ids"], type=ids),
        "rejected_input_ids": pa.array(out["rejected_input_ids"], type=ids),
        "truncated": pa.array(out["truncated"], type=pa.bool_()),
        "row_id": pa.array(out["row_id"], type=pa.int64()),
    })
