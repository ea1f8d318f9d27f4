"""SFT's training stream: examples in a seeded order, packed into blocks in that order.

An SFT example is BOS + prompt + chosen + EOS (a chat-templated text as it is, no special tokens
added: `raydpo.data.tokenize`). Epoch ``e`` orders the train examples by
``order_key(example id, seed, e)`` (`raydpo.data.order`; the id is a digest of the example's
text), cuts that order into chunks of ``chunk`` consecutive examples (``data.tokenize_batch_size``),
concatenates each chunk's tokens and cuts them into ``block_size`` blocks, dropping each chunk's
tail shorter than a block (at most ``block_size - 1`` tokens per chunk). The run's stream is epoch
0's blocks cut to whole global micro-batches, then epoch 1's, and so on.

The order comes before the tokens, so a run that stays inside epoch 0 needs only a prefix of the
order: whole chunks of examples whose text is long enough to fill its blocks at
`CHARS_PER_TOKEN` characters per token (a generous bound: English text and code run ~3-5), found
by the reach pass (`raydpo.data.reach`) before anything is tokenized. Those chunks are the first
chunks of the whole split's order, so the prefix's blocks are the whole split's first blocks. A
prefix whose blocks still fall short (a tokenizer above the bound) is redone over every example.
The eval examples are packed the same way in their own order (`raydpo.data.reach.EVAL_EPOCH`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raydpo.data.order import epoch_order, row_id

CHARS_PER_TOKEN = 8
EXAMPLE_IDS = "example_ids"


def chars_target(blocks: int, block_size: int) -> int:
    """Characters of example text that surely fill ``blocks`` blocks."""
    return blocks * block_size * CHARS_PER_TOKEN


def example_ids(prompts: list[str], chosen: list[str]) -> np.ndarray:
    """The id of each SFT example (prompt + chosen): its place in every epoch's order."""
    return np.fromiter((row_id(p, c) for p, c in zip(prompts, chosen)), dtype=np.int64, count=len(prompts))


def pack_chunk(examples: list[list[int]], block_size: int) -> list[list[int]]:
    """One chunk's examples concatenated and cut into ``block_size`` blocks; the tail is dropped."""
    stream = [t for ex in examples for t in ex]
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def epoch_blocks(examples: list[list[int]], ids, seed: int, epoch: int, block_size: int,
                 chunk: int) -> list[list[int]]:
    """Epoch ``epoch``'s blocks of ``examples`` (token ids, one list each, with their ``ids``)."""
    order = epoch_order(ids, seed, epoch)
    out: list[list[int]] = []
    for lo in range(0, len(order), chunk):
        out += pack_chunk([examples[i] for i in order[lo:lo + chunk]], block_size)
    return out


def pack_epoch(batch, *, seed: int, epoch: int, block_size: int, chunk: int):
    """Ray Data batch function (every example of a split, one block → that epoch's blocks, in
    order): columns ``input_ids`` and ``row_id`` (the block's content digest)."""
    import pyarrow as pa

    blocks = epoch_blocks(batch[EXAMPLE_IDS].to_pylist(), batch["row_id"].to_numpy(), seed, epoch, block_size, chunk)
    return pa.table({"input_ids": pa.array(blocks, type=pa.list_(pa.int32())),
                     "row_id": pa.array([row_id(b) for b in blocks], type=pa.int64())})


def examples_batch(batch, *, tokenizer, revision: str | None = None) -> Any:
    """Ray Data batch function: formatted rows → one tokenized SFT example each (``example_ids``,
    list<int32>) with its ``row_id`` (`example_ids`)."""
    import pyarrow as pa

    from raydpo.data.tokenize import cached_tokenizer, sft_examples, templated

    prompts, chosen = batch["prompt"].to_pylist(), batch["chosen"].to_pylist()
    ids = sft_examples(cached_tokenizer(tokenizer, revision), [p + c for p, c in zip(prompts, chosen)],
                       templated(batch)) if prompts else []
    return pa.table({EXAMPLE_IDS: pa.array(ids, type=pa.list_(pa.int32())),
                     "row_id": pa.array(example_ids(prompts, chosen), type=pa.int64())})
