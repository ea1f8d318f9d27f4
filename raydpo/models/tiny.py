"""The tiny local model: a randomly initialised Llama from a ``LlamaConfig`` and a byte-level BPE
tokenizer trained here on the generated sample — no network, no hub.

Materialized once as an ordinary Hugging Face model folder, so every code path (workers,
merge, ``AutoPeftModelForCausalLM`` loading an adapter) treats it like any local model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from raydpo.config import DataConfig, ModelConfig

# ids 0..3: Llama's order, plus a dedicated pad token. A dedicated pad (rather than pad = EOS, as
# for Llama 2) keeps "is this position padding?" answerable from the ids alone; every loss masks
# padding through the labels/attention mask anyway.
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
BUILD_VERSION = 3  # bump when the build below changes (3: the tokenizer has a chat template)

# The tiny tokenizer's chat template: stack_llama_2's "Question: ...\n\nAnswer: " frame as turns,
# BOS first and EOS closing each answer, a system message as a plain first paragraph. The frame's
# words are whole tokens of this BPE (it is trained on them), and a one-question conversation
# renders to the very text (and token ids) of the default stack-exchange prompt and answer, so the
# conversational demo learns what the default one does. Other roles raise (a counted bad row).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'Question: ' + message['content'] + '\n\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Answer: ' + message['content'] + eos_token -}}"
    "{%- if not loop.last -%}{{- '\n\n' -}}{%- endif -%}"
    "{%- else -%}{{- raise_exception('the tiny chat template knows system, user and assistant turns, not '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Answer: ' -}}{%- endif -%}"
)
_BUILD_LOCK = threading.Lock()


def _key(model_cfg: ModelConfig) -> str:
    """Short hash of everything the folder's content depends on: the ``tiny`` sub-config, this
    build and the generated text the tokenizer is trained on."""
    from raydpo.data.sample import SAMPLE_VERSION

    blob = json.dumps({"tiny": model_cfg.tiny.model_dump(), "build": BUILD_VERSION, "sample": SAMPLE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def ensure_tiny_model(model_cfg: ModelConfig) -> Path:
    """Absolute path of the tiny model folder, building it if needed (race-safe)."""
    root = Path(model_cfg.cache_dir).expanduser().resolve()
    out = root / f"tiny-llama-{_key(model_cfg)}"
    if (out / "config.json").exists():
        return out
    with _BUILD_LOCK:  # threads of one process: one build (the seeded init uses torch's global RNG)
        if (out / "config.json").exists():
            return out
        root.mkdir(parents=True, exist_ok=True)
        # build beside the final folder (same filesystem) and rename: readers never see a
        # half-built folder, and when two processes (Ray workers) race, the first rename wins and
        # the other build is dropped — the two are identical anyway (seeded, deterministic)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
        try:
            build_tiny(model_cfg, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; other users of a shared cache read it
            try:
                os.replace(tmp, out)
            except OSError:  # out exists and is not empty: another process won the race
                if not (out / "config.json").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tokenizer(vocab_size: int, texts: Iterable[str]):
    """A byte-level BPE (any text encodes: code, unicode) trained on ``texts``, wrapped as a
    ``PreTrainedTokenizerFast``: bos ``<s>``, eos ``</s>``, unk ``<unk>``, pad ``<pad>``,
    ``<s>`` prepended to every encoded text (``add_special_tokens=False`` leaves it out), and the
    chat template `CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Llama-style: BOS in front of every encoded text; EOS is appended by the data pipeline
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="right", model_max_length=1_000_000)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llama2_tokenizer(vocab_size: int, texts: Iterable[str]):
    """A tokenizer that splits text the way Llama 2's does, trained on ``texts``: SentencePiece-style
    BPE over a Metaspace pre-tokenizer (spaces become ``▁``, ``▁`` prepended to the first piece
    only), byte fallback (``<0x00>``..``<0xFF>``; newlines are left to it, as in Llama 2), ids 0..2
    ``<unk>`` ``<s>`` ``</s>``, no pad, BOS added and EOS not. Its size: the trainer's ``vocab_size``
    (specials, characters, merges) less pieces holding a newline, plus the 256 byte tokens. Its point is the boundary a
    byte-level BPE hides less loudly: ``"...Answer: "`` alone ends in a lone ``▁`` token, while
    ``"...Answer: Word"`` gives ``▁Word`` (`raydpo.data.tokenize` splits joint encodings for it)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                               show_progress=False))
    # byte fallback: the trainer knows no byte tokens, so put them at Llama 2's ids 3..258 and drop
    # every piece (and merge) holding a newline, which Llama 2's vocabulary encodes as <0x0A>
    spec = json.loads(tok.to_str())
    learned = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
               if t not in specials and "\n" not in t]
    vocab = specials + [f"<0x{b:02X}>" for b in range(256)] + learned
    spec["model"].update(vocab={t: i for i, t in enumerate(vocab)}, byte_fallback=True, fuse_unk=True,
                         merges=[m for m in spec["model"]["merges"] if "\n" not in "".join(m)])
    spec["added_tokens"] = [{**a, "id": vocab.index(a["content"])} for a in spec["added_tokens"]]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="right", model_max_length=1_000_000)


def random_llama(seed: int, dtype=None, device: str = "cpu", **config):
    """A seeded random-init ``LlamaForCausalLM`` of ``LlamaConfig(**config)`` (untied embeddings),
    built directly in ``dtype`` on ``device`` (a 7B model gets no fp32 copy), without touching the
    caller's RNG. The tiny model, the memory benchmark's shapes and the GPU check's 7B use it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(tie_word_embeddings=False, **config)
    before = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(before)


def build_tiny(model_cfg: ModelConfig, out: Path, extra_texts: Iterable[str] = ()) -> None:
    """Write the tokenizer and a randomly initialised ``LlamaForCausalLM`` (seeded) to ``out``.
    The tokenizer is trained on the generated sample, plus ``extra_texts`` (e.g. a benchmark's
    own rows, so a real-text vocabulary fills up to ``vocab_size``)."""
    from raydpo.data.sample import sample_texts

    t = model_cfg.tiny
    # the default prompt frame is in every prompt: give it whole tokens
    frame = DataConfig().prompt_template.format(question="")
    tokenizer = build_tokenizer(t.vocab_size, itertools.chain(sample_texts(3000, seed=t.seed), [frame] * 500,
                                                              extra_texts))
    model = random_llama(
        t.seed, vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
