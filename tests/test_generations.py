"""Eval generations (raydpo.train.generate) in-process: one gloo rank, DeepSpeed ZeRO-2, fp32 CPU,
the tiny Llama. K rows per evaluation with both columns; ``when: end`` generates once; generating
(even sampled) leaves the training numerics alone; the fixed prompts are picked deterministically."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo
from raydpo.data.order import epoch_order, epochs_needed, usable_rows
from raydpo.data.rows import format_prompt
from raydpo.data.sample import generate_rows
from raydpo.data.tokenize import tokenize_dpo
from raydpo.models.factory import load_model, resolve_model_path
from raydpo.data.tokenizer import load_tokenizer
from raydpo.train import generate
from raydpo.data.order import rank_batches
from raydpo.train.engine import WorkerEnv
from raydpo.train.loop import Hooks, run_stage

STEPS, K = 6, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_cache, gloo):
    cfg = Config().with_overrides({
        "model.cache_dir": tiny_cache, "dpo.max_steps": STEPS, "dpo.per_device_batch_size": 2,
        "dpo.log_every": 3, "dpo.eval_every": 3, "dpo.save_every": 100, "dpo.lr": 2e-2,
        "dpo.reference": "adapter_disabled", "lora.dropout": 0.1, "scaling.num_workers": 1,
        "generations.num_prompts": K, "generations.max_new_tokens": 6,
    })
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    rows = generate_rows(16, seed=5)
    cols = tokenize_dpo(tok, [format_prompt(r["question"][:120], cfg.data.prompt_template) for r in rows],
                        [r["response_j"][:120] for r in rows], [r["response_k"][:120] for r in rows], 96, 48)
    cols = {k: np.array(v + [None], dtype=object)[:-1] for k, v in cols.items()}
    order = np.argsort(cols["row_id"].astype(np.int64))
    prompts = generate.held_out_prompts(({k: cols[k][i] for k in ("prompt_input_ids", "chosen_input_ids")}
                                         for i in order), K)
    return cfg, path, tok, cols, prompts


def _run(setup, overrides=None):
    cfg, path, tok, cols, prompts = setup
    cfg = cfg.with_overrides(overrides or {})
    d = cfg.dpo
    torch.manual_seed(0)
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path)
    n, g = len(cols["row_id"]), d.per_device_batch_size
    stream = np.concatenate([epoch_order(cols["row_id"].astype(np.int64), cfg.data.seed, e)[:usable_rows(n, g)]
                             for e in range(epochs_needed(n, g, d.max_steps))])

    def collate(b):
        return collate_dpo(b, tok.pad_token_id, share_prefix=d.share_prefix, pack=d.padding_free)

    def numpy_batches(size):
        for lo in range(0, len(stream) - size + 1, size):
            yield {k: v[stream[lo:lo + size]] for k, v in cols.items()}

    tables, logged = [], {}
    hooks = Hooks(train_batches=lambda skip: rank_batches(numpy_batches, g, 1, 0, collate, skip),
                  eval_batches=lambda: iter([collate({k: v[:4] for k, v in cols.items()})]),
                  report=lambda m, ckpt: None, log=lambda m, s: logged.__setitem__(s, m), progress=lambda s: None,
                  eval_prompts=lambda k: prompts[:k], log_generations=lambda rows, step: tables.append((step, rows)))
    run_stage("dpo", cfg, model, tok, WorkerEnv(0, 1, torch.device("cpu"), False), hooks)
    lora = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return tables, logged, lora, model


@pytest.fixture(scope="module")
def zero2(setup):
    return _run(setup)


def test_every_evaluation_logs_k_rows_of_policy_and_reference(zero2):
    tables, logged, _, model = zero2
    assert [s for s, _ in tables] == [3, 6]  # eval_every=3 and the last step
    for step, rows in tables:
        assert len(rows) == K
        assert [r["prompt_index"] for r in rows] == list(range(K))
        for r in rows:
            assert set(r) == set(generate.COLUMNS) and r["step"] == step
            assert r["prompt"].startswith("Question: ") and r["chosen"]
            assert isinstance(r["policy"], str) and isinstance(r["reference"], str)
    assert [r["prompt"] for r in tables[0][1]] == [r["prompt"] for r in tables[1][1]]  # the same fixed prompts
    # the reference is the adapter-free model: unchanged by training; the trained policy writes otherwise
    assert [r["reference"] for r in tables[0][1]] == [r["reference"] for r in tables[1][1]]
    assert any(r["policy"] != r["reference"] for r in tables[1][1])
    assert model.training  # generation left the model in training mode


def test_zero3_partitioned_weights_generate_the_same_reference(setup, zero2):
    """ZeRO-3 partitions every weight (threshold 0): generate gathers them layer by layer through
    DeepSpeed's hooks; greedy text of the untouched reference equals the ZeRO-2 run's."""
    tables, *_ = _run(setup, {"deepspeed.stage": 3, "deepspeed.stage3_param_persistence_threshold": 0,
                              "generations.when": "end"})
    assert [s for s, _ in tables] == [STEPS] and len(tables[0][1]) == K
    assert [r["reference"] for r in tables[0][1]] == [r["reference"] for r in zero2[0][-1][1]]


def test_when_end_generates_once_and_disabled_never(setup):
    tables, *_ = _run(setup, {"generations.when": "end"})
    assert [s for s, _ in tables] == [STEPS]
    tables, *_ = _run(setup, {"generations.enabled": False})
    assert tables == []


def test_generating_leaves_training_numerics_alone(setup):
    """Sampling draws from the RNG; the RNG is forked around it, so the LoRA weights (dropout 0.1
    draws from the same RNG every step) and the metrics equal a run without generations."""
    _, logged_off, lora_off, _ = _run(setup, {"generations.enabled": False})
    tables, logged_on, lora_on, _ = _run(setup, {"generations.do_sample": True, "generations.temperature": 1.5})
    assert len(tables) == 2
    for k in lora_off:
        assert torch.equal(lora_off[k], lora_on[k]), k
    for step in logged_off:
        for key in ("train/loss", "eval/loss", "eval/rewards/margins"):
            assert logged_on[step].get(key) == logged_off[step].get(key), (step, key)


def test_a_fresh_adapter_writes_what_the_reference_writes(setup):
    cfg, path, tok, _, prompts = setup
    torch.manual_seed(0)
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path)
    before = torch.get_rng_state()
    rows = generate.eval_generations(model, tok, prompts, cfg.generations, step=0, seed=0, rank=0, world_size=1,
                                     device="cpu")
    assert len(rows) == K and all(r["policy"] == r["reference"] for r in rows)  # LoRA B starts at zero
    assert torch.equal(before, torch.get_rng_state())
    # ranks other than 0 generate nothing when the weights are not partitioned (ZeRO-2)
    assert generate.eval_generations(model, tok, prompts, cfg.generations, step=0, seed=0, rank=1, world_size=2,
                                     device="cpu") == []
    # sampled tables are reproducible: seeded by (seed, step)
    sampled = Config().with_overrides({"generations.do_sample": True, "generations.top_k": 20,
                                       "generations.max_new_tokens": 6}).generations
    a, b = (generate.eval_generations(model, tok, prompts, sampled, step=3, seed=0, rank=0, world_size=1,
                                      device="cpu") for _ in range(2))
    assert a == b


def test_held_out_prompts_are_the_first_k_distinct_in_order():
    rows = [{"prompt_input_ids": np.array([1, 2]), "chosen_input_ids": [7]},
            {"prompt_input_ids": [1, 2], "chosen_input_ids": [8]},  # the same prompt, another pair
            {"prompt_input_ids": [1, 3], "chosen_input_ids": [9]},
            {"prompt_input_ids": [1, 4]}]
    assert generate.held_out_prompts(rows, 2) == [{"prompt_input_ids": [1, 2], "chosen_input_ids": [7]},
                                                  {"prompt_input_ids": [1, 3], "chosen_input_ids": [9]}]
    assert [p["chosen_input_ids"] for p in generate.held_out_prompts(rows, 10)] == [[7], [9], []]
    assert generate.held_out_prompts([], 4) == []


def test_left_padding_puts_every_prompt_against_the_right_edge():
    ids, mask = generate._left_padded([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_due_follows_when_and_enabled():
    assert generate.due(Config().generations, last=False) and generate.due(Config().generations, last=True)
    end = Config().with_overrides({"generations.when": "end"}).generations
    assert not generate.due(end, last=False) and generate.due(end, last=True)
    assert not generate.due(Config().with_overrides({"generations.enabled": False}).generations, last=True)


def test_eval_prompts_are_the_first_distinct_prompts_by_row_id_whatever_the_read_order():
    """The driver picks the held-out prompts in one pass (no Ray Data sort: its shuffle tasks do
    not fit a Tune trial's placement group); the result equals sorting every row by row_id."""
    import random

    from raydpo.train.generate import held_out_prompts
    from raydpo.orchestration.ingest import eval_prompts

    rng = random.Random(0)
    rows = [{"row_id": rid, "prompt_input_ids": [1, rng.randrange(12)], "chosen_input_ids": [rid % 7, 2]}
            for rid in rng.sample(range(10_000), 200)]  # ~12 prompts, each with many pairs

    class Split:
        def iter_rows(self):
            return iter(rows)

    for k in (1, 3, 12, 50):
        want = held_out_prompts(sorted(rows, key=lambda r: r["row_id"]), k)
        assert eval_prompts(Split(), k) == want
        assert len(want) == min(k, len({tuple(r["prompt_input_ids"]) for r in rows}))
