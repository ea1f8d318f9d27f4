"""`raydpo.data.packing`: SFT examples are packed in the run's seeded order, chunk by chunk, so
a prefix of whole chunks gives exactly the first blocks of the whole split, and every block is
tokens of whole examples' encodings in order."""

import numpy as np

from raydpo.data.order import epoch_order
from raydpo.data.packing import epoch_blocks, example_ids, pack_chunk
from raydpo.data.tokenize import sft_examples


def _examples(n: int, seed: int = 0) -> tuple[list[list[int]], np.ndarray]:
    rng = np.random.default_rng(seed)
    ex = [[1] + rng.integers(3, 100, rng.integers(1, 40)).tolist() + [2] for _ in range(n)]
    return ex, example_ids([f"q{i}" for i in range(n)], [f"a{i}" for i in range(n)])


def test_a_chunk_is_its_examples_concatenated_and_cut_its_tail_dropped():
    assert pack_chunk([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9 dropped
    assert pack_chunk([[1, 2]], 4) == []


def test_a_prefix_of_whole_chunks_of_the_order_gives_the_first_blocks_of_the_whole_split():
    ex, ids = _examples(500)
    whole = epoch_blocks(ex, ids, seed=7, epoch=0, block_size=16, chunk=32)
    order = epoch_order(ids, 7, 0)
    for chunks in (1, 3, 10):
        first = order[:32 * chunks]  # what the reach pass keeps: whole chunks of epoch 0's order
        part = epoch_blocks([ex[i] for i in first], ids[first], seed=7, epoch=0, block_size=16, chunk=32)
        assert part == whole[:len(part)] and len(part) > 0
    # every block holds the examples' tokens in the epoch's order (the chunk tails aside)
    flat = [t for i in order[:32] for t in ex[i]]
    assert sum(whole[:len(flat) // 16], []) == flat[:len(flat) // 16 * 16]
    assert epoch_blocks(ex, ids, seed=7, epoch=1, block_size=16, chunk=32) != whole  # a new order each epoch


def test_an_example_is_bos_text_eos_and_a_templated_one_is_left_as_it_is():
    class Tok:  # ids = characters, BOS 1 with special tokens, EOS 2
        eos_token_id, is_fast = 2, False

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [([1] if add_special_tokens else []) + [ord(c) for c in t] for t in texts]}

    assert sft_examples(Tok(), ["ab", "<s>c"], [False, True]) == [[1, 97, 98, 2], [60, 115, 62, 99]]
