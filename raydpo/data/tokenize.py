"""Tokenization for SFT (packed blocks) and DPO (prompt / chosen / rejected ids), pure Python
over lists, wrapped by callable classes that Ray Data's ``map_batches`` runs in its workers.

EOS: every response ends with EOS. Truncation (TRL's order, counted in tokens): if prompt +
longer response exceeds ``max_length``, the prompt keeps BOS and its *last*
``max_prompt_length - 1`` tokens; if still too long, both responses are cut to
``max_length - len(prompt)`` — a cut response loses its EOS (it did not end), the same rule for
chosen and rejected.
"""

from __future__ import annotations

from typing import Any


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  max_prompt_length: int, bos_id: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """Returns (prompt, chosen, rejected, truncated)."""
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer <= max_length:
        return prompt, chosen, rejected, False
    if len(prompt) > max_prompt_length:
        if bos_id is not None and prompt and prompt[0] == bos_id:
            prompt = [bos_id] + prompt[len(prompt) - (max_prompt_length - 1):]
        else:
            prompt = prompt[-max_prompt_length:]
    budget = max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget], True


def tokenize_dpo(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str], max_length: int,
                 max_prompt_length: int) -> dict[str, list[Any]]:
    eos = tokenizer.eos_token_id
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    c_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"]
    out: dict[str, list[Any]] = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [], "truncated": []}
    for p, c, r in zip(p_ids, c_ids, r_ids):
        p, c, r, cut = truncate_pair(list(p), list(c) + [eos], list(r) + [eos], max_length, max_prompt_length,
                                     tokenizer.bos_token_id)
        out["prompt_input_ids"].append(p)
        out["chosen_input_ids"].append(c)
        out["rejected_input_ids"].append(r)
        out["truncated"].append(cut)
    return out


def pack_sft(tokenizer, texts: list[str], block_size: int) -> list[list[int]]:
    """BOS + text + EOS per example, concatenated and cut into ``block_size`` blocks. The tail
    shorter than a block is dropped (per Ray Data batch, so at most one block per batch)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


class _Tokenizing:
    def __init__(self, tokenizer_name_or_path: str, revision: str | None = None):
        from raydpo.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_name_or_path, revision=revision)


class DPOTokenize(_Tokenizing):
    """Ray Data callable: formatted rows → prompt/chosen/rejected token ids (pyarrow table)."""

    def __init__(self, tokenizer_name_or_path: str, max_length: int, max_prompt_length: int, revision: str | None = None):
        super().__init__(tokenizer_name_or_path, revision)
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    def __call__(self, batch):
        import pyarrow as pa

        col = lambda k: batch[k].to_pylist()  # noqa: E731
        out = tokenize_dpo(self.tokenizer, col("prompt"), col("chosen"), col("rejected"),
                           self.max_length, self.max_prompt_length)
        ids = pa.list_(pa.int32())
        return pa.table({
            "prompt_input_ids": pa.array(out["prompt_input_ids"], type=ids),
            "chosen_input_ids": pa.array(out["chosen_input_ids"], type=ids),
            "rejected_input_ids": pa.array(out["rejected_input_ids"], type=ids),
            "truncated": pa.array(out["truncated"], type=pa.bool_()),
        })


class SFTPack(_Tokenizing):
    """Ray Data callable: formatted rows → fixed-length packed ``input_ids`` blocks."""

    def __init__(self, tokenizer_name_or_path: str, block_size: int, revision: str | None = None):
        super().__init__(tokenizer_name_or_path, revision)
        self.block_size = block_size

    def __call__(self, batch):
        import pyarrow as pa

        texts = [p + c for p, c in zip(batch["prompt"].to_pylist(), batch["chosen"].to_pylist())]
        blocks = pack_sft(self.tokenizer, texts, self.block_size)
        return pa.table({"input_ids": pa.array(blocks, type=pa.list_(pa.int32()))})
