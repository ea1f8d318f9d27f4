"""The Ray Data pipeline on a real local Ray (2 CPUs): bad rows counted by reason, good rows
kept, sources that cannot be read refused up front, tokenized datasets ready for training."""

import json
import subprocess
import sys

import numpy as np
import torch
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydpo.config import Config
from raydpo.data.rows import REASONS, format_prompt, is_eval

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

GOOD = [{"qid": i, "question": f"How do I do thing {i} in git?", "response_j": f"Run git thing {i}, then commit.",
         "response_k": "No idea.", "date": "2020/01/01", "metadata": [f"https://stackoverflow.com/q/{i}"]}
        for i in range(8)]
BAD = [  # (line, reason)
    (json.dumps({"question": "q", "response_j": "a"}), "missing_field"),
    (json.dumps({"question": None, "response_j": "a", "response_k": "b"}), "null_field"),
    (json.dumps({"question": "q", "response_j": "", "response_k": "b"}), "empty_field"),
    (json.dumps({"question": "   \n", "response_j": "a", "response_k": "b"}), "empty_field"),
    (json.dumps({"question": 12345, "response_j": "a", "response_k": "b"}), "not_text"),
    (json.dumps({"question": "q", "response_j": ["a", "list"], "response_k": "b"}), "not_text"),
    (json.dumps({"question": "q", "response_j": "same", "response_k": "same"}), "chosen_equals_rejected"),
    (json.dumps({"question": "q" * 300, "response_j": "a", "response_k": "b"}), "too_long"),
    ('{"question": "broken json', "bad_json"),
    ("42", "bad_json"),
    (b'{"question": "caf\xe9", "response_j": "a", "response_k": "b"}', "bad_encoding"),
]


@pytest.fixture(scope="module")
def ray_local(ray_connected):
    """The session's cluster (tests/integration/conftest.py), joined by this process."""
    return ray_connected


@pytest.fixture(scope="module")
def cfg_tok(tmp_path_factory):
    from raydpo.models.factory import resolve_model_path

    cfg = Config().with_overrides({"model.cache_dir": str(tmp_path_factory.mktemp("cache")), "data.max_chars": 200,
                                   "data.tokenize_num_cpus": 0.25})
    return cfg, resolve_model_path(cfg.model)


def _with(cfg, **data):
    return cfg.with_overrides({f"data.{k}": v for k, v in data.items()})


def _mixed_jsonl(path):
    lines = [json.dumps(r).encode() for r in GOOD[:4]]
    lines += [line if isinstance(line, bytes) else line.encode() for line, _ in BAD]
    lines += [b"", b"   "]  # blank lines are not rows
    lines += [json.dumps(r).encode() for r in GOOD[4:]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _expected_dropped():
    want = dict.fromkeys(REASONS, 0)
    for _, reason in BAD:
        want[reason] += 1
    return want


def test_mixed_jsonl_counts_every_bad_row_under_its_reason_and_keeps_every_good_one(ray_local, cfg_tok, tmp_path):
    from raydpo.data.stats import compute_stats, format_stats

    cfg, tok = cfg_tok
    s = compute_stats(_with(cfg, source=str(_mixed_jsonl(tmp_path / "mixed.jsonl"))), tok)
    assert s["rows"] == len(GOOD) + len(BAD) and s["valid"] == len(GOOD)
    assert s["dropped"] == _expected_dropped()
    assert s["valid"] + sum(s["dropped"].values()) == s["rows"]
    assert s["dpo_pairs"] == len(GOOD) and s["truncated_pairs"] == 0
    assert s["train_pairs"] + s["eval_pairs"] == len(GOOD)
    assert s["eval_pairs"] == sum(is_eval(r["question"], cfg.data.eval_fraction) for r in GOOD)
    assert s["token_lengths"]["prompt"]["max"] >= s["token_lengths"]["prompt"]["p50"] > 5
    assert s["example"]["prompt"].startswith("Question: How do I do thing")
    text = format_stats(s)
    assert "rows read: 19" in text and "dropped bad_encoding: 1" in text and "dropped empty_field: 2" in text
    json.dumps(s)  # the CLI's --json
    # the fast path (task-based sort shuffle for the two small reductions) gives the numbers Ray
    # Data's default shuffle gives, and leaves the caller's strategy alone
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    default = DataContext.get_current().shuffle_strategy
    assert default != ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # a different path
    plain = compute_stats(_with(cfg, source=str(tmp_path / "mixed.jsonl")), tok, task_shuffle=False)
    assert s == plain and DataContext.get_current().shuffle_strategy == default


def test_a_folder_mixing_jsonl_json_array_jsonl_as_json_and_parquet(ray_local, cfg_tok, tmp_path):
    from raydpo.data.stats import compute_stats

    cfg, tok = cfg_tok
    _mixed_jsonl(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text(json.dumps(GOOD[:3] + [{"question": "q", "response_j": None, "response_k": "b"},
                                                             "not a row"]))
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in GOOD[3:6]))  # JSON Lines named .json
    pq.write_table(pa.Table.from_pylist(GOOD[6:] + [{**GOOD[0], "response_k": None}]), tmp_path / "d.parquet")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / "_SUCCESS").write_text("")
    s = compute_stats(_with(cfg, source=str(tmp_path)), tok)
    want = _expected_dropped()
    want["null_field"] += 2
    want["bad_json"] += 1
    assert s["dropped"] == want
    assert s["valid"] == len(GOOD) + 3 + 3 + 2 and s["rows"] == s["valid"] + sum(want.values())
    from raydpo.data.pipeline import validated

    assert validated(_with(cfg, source=str(tmp_path), max_rows=5).data).count() == 5  # rows read, good or bad


def test_the_shared_shape_of_real_data_a_json_array_file(ray_local, cfg_tok, tmp_path):
    from raydpo.data.stats import compute_stats

    cfg, tok = cfg_tok
    long = "```\nfor (int i = 0; i < n; i++) { printf(\"%d\\n\", i); }\n```\n" * 20
    rows = [{"question": f"Why does loop {i} fail? " + long, "response_j": "Because " + long, "response_k": "Dunno."}
            for i in range(6)]
    (tmp_path / "real.json").write_text(json.dumps(rows))
    s = compute_stats(_with(cfg, source=str(tmp_path / "real.json"), max_chars=200_000, max_length=128,
                            max_prompt_length=64), tok)
    assert s["valid"] == 6 and s["truncated_pairs"] == 6
    assert s["token_lengths"]["prompt"]["max"] == 64
    assert s["token_lengths"]["chosen"]["max"] == 128 - 64


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "nope.jsonl", "no such file or folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no .jsonl, .json or .parquet files"),
    (lambda p: (p / "broken.json").write_text('[{"question": "a"') and p / "broken.json", "not valid JSON"),
    (lambda p: (p / "bad.parquet").write_bytes(b"not parquet") and p / "bad.parquet", "not a readable parquet"),
    (lambda p: (p / "rows.csv").write_text("a,b") and p / "rows.csv", "unsupported file type"),
])
def test_unreadable_sources_raise_one_line_errors_naming_them(ray_local, cfg_tok, tmp_path, make, needle):
    from raydpo.data.pipeline import build_datasets
    from raydpo.data.sources import DataSourceError
    from raydpo.data.stats import compute_stats

    cfg, tok = cfg_tok
    path = make(tmp_path)
    bad = _with(cfg, source=str(path))
    with pytest.raises(DataSourceError) as e:
        compute_stats(bad, tok)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg
    with pytest.raises(DataSourceError):
        build_datasets(bad, "dpo", tok)


def test_cli_data_stats_exit_2_on_a_missing_source(tmp_path):
    r = subprocess.run([sys.executable, "-m", "raydpo.cli", "data", "stats", "--source", str(tmp_path / "nope.jsonl"),
                        "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert "nope.jsonl" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_data_stats_json_is_the_only_thing_on_stdout(tmp_path):
    """`--json` output pipes into jq: library chatter (DeepSpeed's accelerator warning while the
    tiny model is built in a fresh cache, Ray worker logs) goes to stderr."""
    r = subprocess.run([sys.executable, "-m", "raydpo.cli", "data", "stats", "--json",
                        "--source", str(_mixed_jsonl(tmp_path / "mixed.jsonl")), "--set", "data.max_chars=200"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.splitlines()) == 1, r.stdout[:2000]
    s = json.loads(r.stdout)
    assert (s["rows"], s["valid"], s["dpo_pairs"]) == (len(GOOD) + len(BAD), len(GOOD), len(GOOD))
    assert s["dropped"] == _expected_dropped() and s["example"]["prompt"].startswith("Question: ")


def test_build_datasets_dpo_streams_valid_pairs_split_by_question(ray_local, cfg_tok, tmp_path):
    from transformers import AutoTokenizer

    from raydpo.data.pipeline import build_datasets
    from raydpo.data.ray_collate import DPOCollate
    from raydpo.data.sample import generate_rows

    cfg, tok_path = cfg_tok
    cfg = _with(cfg, sample_size=300, eval_fraction=0.2, max_length=256, max_prompt_length=128, max_chars=200_000)
    tok = AutoTokenizer.from_pretrained(tok_path)
    train, evals = build_datasets(cfg, "dpo", tok_path)
    train, evals = train.materialize(), evals.materialize()
    n_train, n_eval = train.count(), evals.count()
    rows = generate_rows(300, cfg.data.seed)
    want_eval = sum(is_eval(r["question"], 0.2) for r in rows)
    assert (n_train, n_eval) == (300 - want_eval, want_eval) and 30 < n_eval < 90
    assert set(train.columns()) == {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "truncated", "row_id"}
    # eval holds exactly the eval questions' prompts (the template's trailing space is the
    # response's first token: prompt and response are encoded together, raydpo.data.tokenize)
    eval_prompts = {tok.decode(r["prompt_input_ids"][1:]) for r in evals.take_all()}
    assert eval_prompts == {format_prompt(r["question"], cfg.data.prompt_template).removesuffix(" ") for r in rows
                            if is_eval(r["question"], 0.2)}
    for r in train.take(50):
        p, c, j = r["prompt_input_ids"], r["chosen_input_ids"], r["rejected_input_ids"]
        assert p[0] == tok.bos_token_id and len(p) + max(len(c), len(j)) <= 256 and not r["truncated"]
        assert c[-1] == tok.eos_token_id and j[-1] == tok.eos_token_id
    # what a training worker sees: the plain layout (chosen rows then rejected rows), and the default
    # padding-free layout (one row, the prompt once per pair); both score the same response tokens
    plain = next(iter(train.iter_torch_batches(batch_size=4, collate_fn=DPOCollate(tok.pad_token_id))))
    assert plain["input_ids"].shape[0] == 8 and plain["input_ids"].shape[1] <= 256
    real = plain["attention_mask"].gather(1, plain["score_pos"].clamp(min=0))
    assert ((plain["score_slot"] < 0) | (real == 1)).all()  # no position that is padding is scored
    fast = next(iter(train.iter_torch_batches(batch_size=4, collate_fn=DPOCollate(tok.pad_token_id, True, True))))
    assert fast["input_ids"].shape[0] == 1 and (fast["seq_ids"] >= 0).all() and fast["spans"].shape == (4, 4)
    assert torch.equal(fast["pair_lengths"], plain["pair_lengths"])
    assert (fast["score_slot"] >= 0).sum() == (plain["score_slot"] >= 0).sum() == plain["pair_lengths"][:, 1:].sum()


def test_sft_tokenizes_the_examples_its_blocks_need_and_packs_them_in_the_runs_order(ray_local, cfg_tok, monkeypatch):
    """`sft_data`: a 3-step SFT run on 600 examples tokenizes whole chunks of its seeded order
    (not all 600) and its stream is the first blocks every example would give; a bound on
    characters per token that does not hold falls back to every example, with the same blocks."""
    import raydpo.data.packing as packing
    from raydpo.data.ray_collate import SFTCollate
    from raydpo.orchestration.ingest import sft_data

    cfg, tok_path = cfg_tok
    cfg = _with(cfg, sample_size=600, sft_block_size=64, max_chars=200_000, tokenize_batch_size=2).with_overrides(
        {"scaling.num_workers": 2, "sft.per_device_batch_size": 4, "sft.max_steps": 3, "sft.eval_max_batches": 1})
    said = []
    stream, evals = sft_data(cfg, tok_path, said.append)
    assert stream.columns() == ["input_ids", "row_id"]
    blocks = [list(x) for x in stream.to_pandas()["input_ids"]]
    assert len(blocks) == 3 * 8 and {len(b) for b in blocks} == {64}
    assert evals.count() >= 8 and {len(x) for x in evals.to_pandas()["input_ids"]} == {64}
    n = int(said[0].split(" of ")[0].split()[-1].replace(",", ""))
    assert n % 2 == 0 and 0 < n < 560, said  # whole chunks, a fraction of the examples
    batch = next(iter(stream.iter_torch_batches(batch_size=8, collate_fn=SFTCollate())))
    assert batch["input_ids"].shape == (8, 64) and (batch["labels"] == batch["input_ids"]).all()
    monkeypatch.setattr(packing, "CHARS_PER_TOKEN", 0.001)  # finds one chunk, too few: redone over every one
    said2 = []
    again, _ = sft_data(cfg, tok_path, said2.append)
    assert any("tokenizing every example" in s for s in said2), said2
    assert [list(x) for x in again.to_pandas()["input_ids"]] == blocks


def test_the_training_stream_is_the_same_sorted_in_one_task_or_by_ray_datas_distributed_sort(ray_local, cfg_tok):
    """`ordered_stream` sorts a small split whole in one task (the fast path) and a large one with
    Ray Data's distributed sort: the same rows in the same order, epoch after epoch, and the
    order `raydpo.data.order` defines (what the torchrun runner and a resumed worker rebuild)."""
    from raydpo.data.order import epoch_order, usable_rows
    from raydpo.data.pipeline import build_datasets
    from raydpo.orchestration.ingest import gather_split, ordered_stream

    cfg, tok_path = cfg_tok
    train, _ = build_datasets(_with(cfg, sample_size=120, max_chars=200_000), "dpo", tok_path)
    train = train.repartition(3).materialize()  # several blocks, as a real split has
    n, g = train.count(), 8
    kw = {"seed": 3, "global_batch": g, "micro_batches": n // g + 1, "num_cpus": 0.25}  # 2 epochs
    one_block = gather_split(train)
    assert one_block.num_blocks() == 1 and gather_split(train, local_sort_max_bytes=0).num_blocks() == 3
    whole = ordered_stream(one_block, n, **kw).to_pandas()
    distributed = ordered_stream(train, n, **kw).to_pandas()
    assert len(whole) == kw["micro_batches"] * g > usable_rows(n, g)  # what the run reaches: into epoch 1
    assert whole["row_id"].tolist() == distributed["row_id"].tolist()
    for col in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert [list(x) for x in whole[col]] == [list(x) for x in distributed[col]], col
    ids = train.to_pandas()["row_id"].to_numpy()
    want = np.concatenate([ids[epoch_order(ids, 3, e)][:usable_rows(n, g)] for e in range(2)])[:len(whole)]
    assert whole["row_id"].tolist() == want.tolist()


def test_a_run_inside_epoch_0_tokenizes_only_the_rows_it_reaches_and_trains_on_the_same_stream(ray_local, cfg_tok):
    """`find_reach` + `build_datasets(reach)`: a 3-step run on 600 pairs tokenizes its 24 train
    pairs (and its 16 eval pairs), and its training stream is row for row the stream the whole
    split gives; a run that reaches epoch 1 reads every row (here from the same pass: a small source)."""
    from raydpo.data.pipeline import build_datasets, find_reach
    from raydpo.orchestration.ingest import gather_split, ordered_stream

    cfg, tok_path = cfg_tok
    cfg = _with(cfg, sample_size=600, max_chars=200_000, seed=5).with_overrides(
        {"scaling.num_workers": 2, "dpo.per_device_batch_size": 4, "dpo.max_steps": 3, "dpo.eval_max_batches": 2})
    reach = find_reach(cfg, "dpo", tok_path)
    part, part_eval = build_datasets(cfg, "dpo", tok_path, reach)
    full, full_eval = build_datasets(cfg, "dpo", tok_path)
    full, part = gather_split(full), gather_split(part)
    n, g, steps = full.count(), 8, 3
    assert (reach.n_train, reach.n_eval) == (n, full_eval.count()) and n > 500
    assert part.count() == len(reach.train_ids) == steps * g and part_eval.count() == 2 * g
    kw = {"seed": 5, "global_batch": g, "micro_batches": steps, "num_cpus": 0.25}
    a = ordered_stream(part, part.count(), **kw).to_pandas()
    b = ordered_stream(full, n, **kw).to_pandas()
    assert len(a) == steps * g and a["row_id"].tolist() == b["row_id"].tolist()
    assert [list(x) for x in a["chosen_input_ids"]] == [list(x) for x in b["chosen_input_ids"]]
    two_epochs = cfg.with_overrides({"dpo.max_steps": n // g + 1, "dpo.eval_max_batches": None})
    wide = find_reach(two_epochs, "dpo", tok_path)
    assert wide.want.train is None and wide.want.eval is None and len(wide.train_ids) == wide.n_train == n


def test_sample_source_end_to_end(ray_local, cfg_tok):
    from raydpo.data.stats import compute_stats

    cfg, tok = cfg_tok
    s = compute_stats(_with(cfg, source="sample", sample_size=400, max_chars=200_000), tok)
    assert s["rows"] == 400 and s["valid"] == 400 and s["dpo_pairs"] == 400
    assert set(s["dropped"].values()) == {0} and s["truncated_pairs"] == 0
    assert 0 < s["eval_pairs"] < 60 and s["train_pairs"] + s["eval_pairs"] == 400
    assert s["sft_blocks"] > 0 and s["token_lengths"]["chosen"]["p50"] < 100


def test_ray_workers_racing_to_build_the_tiny_model_share_one_folder(ray_local, tmp_path):
    import ray

    @ray.remote(num_cpus=0.5)
    def build(cache_dir: str) -> str:
        from raydpo.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(Config().with_overrides({"model.cache_dir": cache_dir}).model))

    paths = ray.get([build.remote(str(tmp_path)) for _ in range(3)])
    assert len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].rsplit("/", 1)[-1]]  # no half-built leftovers

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(paths[0]).eos_token == "</s>"
    assert AutoModelForCausalLM.from_pretrained(paths[0]).config.num_hidden_layers == 2


# -- other data formats (raydpo.data.formats) -------------------------------------------------

def _msgs(role, text):
    return [{"role": role, "content": text}]


CONV_GOOD = [{"prompt": _msgs("user", f"How do I do thing {i} in git?"),
              "chosen": _msgs("assistant", f"Run git thing {i}, then commit."),
              "rejected": _msgs("assistant", "No idea.")} for i in range(6)]
CONV_BAD = [  # (row, reason)
    ({**CONV_GOOD[0], "prompt": "How?"}, "not_messages"),
    ({**CONV_GOOD[0], "prompt": _msgs("human", "How?")}, "bad_role"),
    ({**CONV_GOOD[0], "prompt": _msgs("user", "  ")}, "empty_content"),
    ({**CONV_GOOD[0], "rejected": CONV_GOOD[0]["chosen"]}, "chosen_equals_rejected"),
    ({**CONV_GOOD[0], "prompt": _msgs("tool", "42")}, "template_error"),  # the tiny template knows no tool turns
]


def test_conversational_jsonl_is_detected_rendered_with_the_chat_template_and_bad_rows_counted(ray_local, cfg_tok,
                                                                                                tmp_path):
    from raydpo.data.stats import compute_stats

    cfg, tok = cfg_tok
    rows = CONV_GOOD[:3] + [r for r, _ in CONV_BAD] + CONV_GOOD[3:]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = compute_stats(_with(cfg, source=str(path)), tok)
    assert s["format"] == "conversational" and s["rows"] == len(rows) and s["valid"] == len(CONV_GOOD)
    want = dict.fromkeys(REASONS, 0)
    for _, reason in CONV_BAD:
        want[reason] += 1
    assert s["dropped"] == want
    assert s["example"]["prompt"].startswith("<s>Question: How do I do thing") and s["example"]["chosen"].endswith("</s>")
    # the split hashes the rendered prompt
    rendered = [f"<s>Question: {r['prompt'][0]['content']}\n\nAnswer: " for r in CONV_GOOD]
    assert s["eval_pairs"] == sum(is_eval(p, cfg.data.eval_fraction) for p in rendered)


def test_conversational_sample_trains_on_the_tokens_of_the_default_sample(ray_local, cfg_tok):
    """The tiny chat template frames a turn like the default prompt template: the same pairs."""
    from raydpo.data.pipeline import build_datasets

    cfg, tok_path = cfg_tok
    cfg = _with(cfg, sample_size=120, max_length=256, max_prompt_length=128, max_chars=200_000)
    keys = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")

    def pairs(c):
        train, evals = build_datasets(c, "dpo", tok_path)
        return sorted(tuple(tuple(int(x) for x in r[k]) for k in keys) for r in train.take_all() + evals.take_all())

    assert pairs(_with(cfg, format="conversational")) == pairs(cfg)


def test_renamed_parquet_columns_and_an_sft_only_source(ray_local, cfg_tok, tmp_path):
    from raydpo.data.pipeline import validated
    from raydpo.data.sources import read

    cfg, tok = cfg_tok
    pq.write_table(pa.Table.from_pylist([{"instruction": f"Say hi {i}", "good": "Hi!", "bad": "No."} for i in range(5)]),
                   tmp_path / "renamed.parquet")
    renamed = _with(cfg, source=str(tmp_path / "renamed.parquet"),
                    columns={"prompt": "instruction", "chosen": "good", "rejected": "bad"})
    ds, fmt = read(renamed.data, "dpo", tok)
    rows = ds.take_all()
    assert fmt == "standard" and [r["reason"] for r in rows] == [""] * 5 and rows[0]["prompt"].startswith("Say hi")
    sft_file = _mixed_jsonl(tmp_path / "sft.jsonl")
    both = _with(cfg, source="sample", sample_size=40, sft_source=str(sft_file))
    assert validated(both.data, "sft", tok).count() == len(GOOD) + len(BAD)
    assert validated(both.data, "dpo", tok).count() == 40


def test_columns_of_no_known_format_are_one_error_naming_them(ray_local, cfg_tok, tmp_path):
    from raydpo.data.sources import DataSourceError
    from raydpo.data.stats import compute_stats

    cfg, tok = cfg_tok
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"input": "q", "output": "a"}) + "\n")
    with pytest.raises(DataSourceError) as e:
        compute_stats(_with(cfg, source=str(path)), tok)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "input, output" in msg and "conversational" in msg and "\n" not in msg
