"""The Ray Data pipeline on a real local Ray: bad rows counted by reason, good rows kept."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
GOOD = [{"qid": i, "question": f"How do I do thing {i}?", "response_j": f"Do it like {i}.", "response_k": "No idea."}
        for i in range(7)]
BAD_LINES = [
    json.dumps({"question": "q", "response_j": "a"}),                                  # missing_field
    json.dumps({"question": None, "response_j": "a", "response_k": "b"}),              # null_field
    json.dumps({"question": "q", "response_j": "", "response_k": "b"}),                # empty_field
    json.dumps({"question": "   ", "response_j": "a", "response_k": "b"}),             # empty_field
    json.dumps({"question": 12345, "response_j": "a", "response_k": "b"}),             # not_text
    json.dumps({"question": "q", "response_j": "same", "response_k": "same"}),         # chosen_equals_rejected
    '{"question": "broken json',                                                       # bad_json
]


def _stats(*args, cwd):
    return subprocess.run([sys.executable, "-m", "raydpo.cli", "data", "stats", *args,
                           "--set", f"model.cache_dir={REPO / '.raydpo_cache'}"],
                          capture_output=True, text=True, cwd=cwd, timeout=500)


def test_mixed_file_counts_every_bad_row_and_keeps_every_good_one(tmp_path):
    f = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in GOOD[:4]] + BAD_LINES + [json.dumps(r) for r in GOOD[4:]]
    f.write_text("\n".join(lines) + "\n")
    r = _stats("--source", str(f), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["rows"] == 14 and s["valid"] == 7 and s["dpo_pairs"] == 7
    assert s["valid"] + sum(s["dropped"].values()) == s["rows"]
    assert s["dropped"] == {"bad_json": 1, "missing_field": 1, "null_field": 1, "not_text": 1, "empty_field": 2,
                            "chosen_equals_rejected": 1, "too_long": 0}
    assert s["train_pairs"] + s["eval_pairs"] == 7 and s["sft_blocks"] >= 0
    assert s["example"]["prompt"].startswith("Question: How do I do thing")


def test_sample_source_and_a_missing_source(tmp_path):
    r = _stats("--source", "sample", "--json", "--set", "data.sample_size=300", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["rows"] == 300 and s["valid"] == 300 and s["dpo_pairs"] == 300 and s["sft_blocks"] > 0
    assert s["token_lengths"]["chosen"]["max"] <= 1024
    human = _stats("--source", "sample", "--set", "data.sample_size=50", cwd=tmp_path)
    assert human.returncode == 0 and "rows read: 50" in human.stdout and "example:" in human.stdout
    missing = _stats("--source", str(tmp_path / "nope.jsonl"), "--json", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stdout == ""
    assert "nope.jsonl" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_build_datasets_stream_tokenized_columns(tmp_path):
    import ray

    from raydpo.config import load_config
    from raydpo.data.pipeline import build_datasets
    from raydpo.models import resolve_model_path

    cfg = load_config(None, ["data.sample_size=400", "data.eval_fraction=0.2", "data.sft_block_size=64",
                             "data.max_length=96", "data.max_prompt_length=48", f"model.cache_dir={REPO / '.raydpo_cache'}"])
    tok = resolve_model_path(cfg.model)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        train, evals = build_datasets(cfg, "dpo", tok)
        n_train, n_eval = train.count(), evals.count()
        assert n_train + n_eval == 400 and 40 < n_eval < 120
        row = train.take(1)[0]
        assert set(row) == {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "truncated"}
        assert len(row["prompt_input_ids"]) + max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"])) <= 96
        sft_train, _ = build_datasets(cfg, "sft", tok)
        blocks = sft_train.take(3)
        assert blocks and all(len(b["input_ids"]) == 64 for b in blocks)
    finally:
        ray.shutdown()
