"""The reference scored by the training workers at the fit's start (`raydpo.train.ref_scoring`)
gives the numbers the Ray Data pass gives, reaches every batch by ``row_id``, and leaves the cache
the next run reuses."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydpo import storage
from raydpo.config import Config
from raydpo.data.rows import format_prompt
from raydpo.data.sample import generate_rows
from raydpo.data.tokenize import tokenize_dpo
from raydpo.data.tokenizer import load_tokenizer
from raydpo.models.factory import load_model, resolve_model_path
from raydpo.train import ref_scoring
from raydpo.train.ref_scoring import REF_KEYS, RefTable


def test_every_row_goes_to_exactly_one_rank():
    for n in (0, 1, 5, 8, 33):
        for world in (1, 2, 3, 4):
            got = [i for r in range(world) for i in range(n)[ref_scoring.my_rows(n, world, r)]]
            assert got == list(range(n))


def test_a_batch_gets_its_rows_reference_sums_by_row_id_whatever_the_order():
    table = RefTable.merged([RefTable.of([30, 10], [-3.0, -1.0], [-30.0, -10.0]), RefTable.of([20], [-2.0], [-20.0])])
    out = table.attach({"row_id": np.array([20, 30, 10, 20]), "x": np.arange(4)})
    assert out["x"].tolist() == [0, 1, 2, 3]
    assert out[REF_KEYS[0]].tolist() == [-2.0, -3.0, -1.0, -2.0]
    assert out[REF_KEYS[1]].tolist() == [-20.0, -30.0, -10.0, -20.0]


def test_a_row_never_scored_is_an_error_naming_it_not_a_silent_zero():
    table = RefTable.of([1, 2], [0.0, 0.0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match=r"1 row\(s\) .* no reference log-probs \(row_id 7\)"):
        table.attach({"row_id": np.array([1, 7])})
    with pytest.raises(RuntimeError, match="no reference log-probs"):
        RefTable.of([], [], []).attach({"row_id": np.array([1])})


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_cache):
    """Twelve tokenized pairs, the policy model, and what the Ray Data pass's scorer gives them."""
    from raydpo.orchestration.reference import RefLogps

    tmp = tmp_path_factory.mktemp("refs")
    cfg = Config().with_overrides({"model.cache_dir": tiny_cache, "quantization.mode": "none"})
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    rows = generate_rows(12, seed=3)
    ids = tokenize_dpo(tok, [format_prompt(r["question"], cfg.data.prompt_template) for r in rows],
                       [r["response_j"] for r in rows], [r["response_k"] for r in rows], 128, 64)
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in ids.items() if k.endswith("_input_ids")}
                     ).append_column("row_id", pa.array(ids["row_id"], type=pa.int64()))
    ray_data = RefLogps(cfg.to_dict(), path)(table)
    torch.manual_seed(0)
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path)
    return cfg, tok, table, ray_data, model, tmp


def _batches(table, n):
    for lo in range(0, table.num_rows, n):
        part = table.slice(lo, n)
        yield {k: part[k].to_numpy(zero_copy_only=False) for k in part.column_names}


def test_workers_score_what_the_ray_data_pass_scores_and_write_a_cache_the_next_run_reads(scored, tmp_path):
    """One worker (no process group) scores train and eval rows through `score_reference`: its sums
    equal the Ray Data pass's (padding-free, so batching does not matter), it writes both splits'
    rows with their sums as parquet, marks the folder, and a restarted worker reads them back
    instead of scoring again."""
    from raydpo.orchestration.reference import cached_ids, commit_cache, valid_cache

    cfg, tok, table, ray_data, model, _ = scored
    building, lines = str(tmp_path / ".cache.building-1"), []
    splits = {"train": lambda n: _batches(table.slice(0, 9), n), "eval": lambda n: _batches(table.slice(9), n)}
    got = ref_scoring.score_reference(model, splits, building, pad_token_id=tok.pad_token_id, dpo=cfg.dpo,
                                      device=torch.device("cpu"), rank=0, world=1, progress=lines.append)
    assert len(got) == 12 and "scored 12 pairs" in lines[-1]
    want = ray_data.to_pydict()
    out = got.attach({"row_id": np.array(want["row_id"])})
    for k in REF_KEYS:
        np.testing.assert_allclose(out[k], np.array(want[k], np.float32), rtol=1e-6, atol=1e-4)
    assert storage.exists(storage.reference_scored(building))
    again = ref_scoring.score_reference(model, {}, building, pad_token_id=tok.pad_token_id, dpo=cfg.dpo,
                                        device=torch.device("cpu"), rank=0, world=1, progress=lines.append)
    assert "read the 12" in lines[-1] and np.array_equal(again.ids, got.ids) and np.array_equal(again.chosen, got.chosen)
    root = str(tmp_path / "cache")
    commit_cache(building, root, {"key": {}, "n": [9, 3]})
    assert valid_cache(root)["rows"] == {"train": 9, "eval": 3}
    assert sorted(cached_ids(storage.reference_split(root, "train"))) == sorted(want["row_id"][:9])


def test_the_torchrun_runner_scores_its_columns_like_the_ray_data_pass(scored):
    cfg, tok, table, ray_data, model, _ = scored
    cols = {k: table[k].to_pylist() for k in table.column_names}
    ref_scoring.add_reference(model, cols, tok.pad_token_id, cfg.dpo, torch.device("cpu"))
    for k in REF_KEYS:
        np.testing.assert_allclose(cols[k], ray_data[k].to_pylist(), rtol=1e-6, atol=1e-4)
