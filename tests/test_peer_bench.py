"""The TRL peer benchmark compares on distinct rows and in every layout a user could pick.

Identical rows give raydpo identical order keys, so each global batch would be copies of one pair
(no padding, no straggler): the benchmark's pairs, generated or a repeated file, must all differ,
in their token ids and in raydpo's ``row_id``, and it must refuse to run when they do not."""

from __future__ import annotations

import json

import pytest

from raydpo.benchmarks import peer
from raydpo.config import DataConfig
from raydpo.data.sample import generate_rows
from raydpo.models.tiny import build_tokenizer

TEMPLATE = DataConfig().prompt_template
SHARED_QUESTION = "How do I revert a merge commit that was already pushed?"
SMALL_FILE = [  # two answers to one question, as stack-exchange-paired has
    {"question": SHARED_QUESTION, "response_j": "Use git revert -m 1 on the merge.", "response_k": "Delete the repo."},
    {"question": SHARED_QUESTION, "response_j": "git revert -m 1 <merge sha>, then push.", "response_k": "Force push."},
    {"question": "Why is my list empty after filter() in Python 3?", "response_j": "filter is lazy: wrap it in list().",
     "response_k": "Python is broken."},
]


@pytest.fixture(scope="module")
def tok():
    texts = [t for r in generate_rows(200, 0) + SMALL_FILE for t in (r["question"], r["response_j"], r["response_k"])]
    return build_tokenizer(600, texts)


def pairs_of(rows, tok, max_length=256, eval_fraction=0.0):
    return peer.train_pairs(rows, tok, max_length, 128, eval_fraction, TEMPLATE)


def assert_distinct(pairs):
    ids = [(tuple(p["prompt_input_ids"]), tuple(p["chosen_input_ids"]), tuple(p["rejected_input_ids"])) for p in pairs]
    assert len(set(ids)) == len(ids)
    assert len({p["row_id"] for p in pairs}) == len(pairs)
    assert peer.duplicates(pairs) == {"token_ids": 0, "row_id": 0}


def test_the_generated_sample_gives_distinct_pairs(tok):
    pairs = pairs_of(peer.load_rows(None, 400, 0, 1), tok)
    assert len(pairs) == 400
    assert_distinct(pairs)


def test_a_repeated_file_gives_distinct_pairs_of_near_equal_length(tok, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(SMALL_FILE))
    rows = peer.load_rows(str(path), 0, 0, 16)
    assert len(rows) == 48
    assert rows[:3] == SMALL_FILE  # copy 0 is the file as it is
    assert rows[3]["question"] == SHARED_QUESTION + " (copy 1)"
    pairs = pairs_of(rows, tok)
    assert_distinct(pairs)
    # the marker lengthens the prompt by a few tokens (at most one per byte), the responses not at all
    by_copy = [pairs[k * 3:(k + 1) * 3] for k in range(16)]
    for k, copy in enumerate(by_copy[1:], 1):
        for p, p0 in zip(copy, by_copy[0]):
            assert 0 < len(p["prompt_input_ids"]) - len(p0["prompt_input_ids"]) <= len(peer.MARKER.format(k=k))
            for k in ("chosen_input_ids", "rejected_input_ids"):
                assert p[k] == p0[k]


def test_the_marker_survives_prompt_truncation(tok):
    """A long question keeps its end (``Answer:`` frame and the marker) when the prompt is cut."""
    long_q = {**SMALL_FILE[2], "question": "word " * 400 + SMALL_FILE[2]["question"]}
    pairs = pairs_of([long_q, {**long_q, "question": long_q["question"] + " (copy 1)"}], tok, max_length=160)
    assert len(pairs[0]["prompt_input_ids"]) == len(pairs[1]["prompt_input_ids"]) == 128
    assert_distinct(pairs)


def test_the_benchmark_refuses_duplicate_pairs(tok):
    rows = [SMALL_FILE[0], dict(SMALL_FILE[0])]  # a file holding one row twice
    with pytest.raises(SystemExit, match="distinct rows"):
        peer.check_distinct(pairs_of(rows, tok))


def test_trl_runs_in_every_layout_with_the_same_global_batch():
    assert peer.trl_layouts(2, 8, 2) == [(1, 2), (2, 1)]
    assert peer.trl_layouts(4, 8, 2) == [(1, 4), (2, 2), (4, 1), (2, 1)]  # raydpo's layout added
    assert peer.trl_layouts(6, 8, 2) == [(1, 6), (2, 3), (2, 1)]  # 3 and 6 processes do not divide 8


def test_only_selects_rows_by_key_or_group():
    rows = peer.all_rows(2, 8, 2)
    assert [r.key for r in peer.select(rows, "trl,default")] == ["trl-1x2", "trl-2x1", "default"]
    assert [r.key for r in peer.select(rows, "all-off,trl-2x1")] == ["trl-2x1", "all-off"]
    assert {r.group for r in peer.select(rows, "raydpo")} == {"raydpo", "ablations"}
    assert all(r.group != "trl" for r in peer.select(rows, None, no_trl=True))
    assert all(r.group != "ablations" for r in peer.select(rows, None, no_ablations=True))
    with pytest.raises(SystemExit, match="unknown"):
        peer.select(rows, "trl,defualt")


def test_all_off_switches_every_raydpo_only_fast_path_and_keeps_the_reference_precomputed():
    off = next(r for r in peer.all_rows(2, 8, 2) if r.key == "all-off")
    assert off.layout == (2, 1)
    assert off.overrides == {"dpo.completion_only_logits": False, "dpo.share_prefix": False,
                             "dpo.padding_free": False, "dpo.fused_lm_head": False, "dpo.balance_ranks": False,
                             "dpo.reference_scoring": "ray_data"}
    assert "dpo.reference" not in off.overrides  # precomputed, as TRL's fastest
    ablated = {k for over in (o for _, o in peer.FAST_PATHS.values()) for k in over}
    assert set(off.overrides) <= ablated  # each fast path of the all-off row has its own ablation row
    ok, unknown = peer.accepted({**off.overrides, "dpo.no_such_path": False})
    assert "dpo.no_such_path" in unknown and "dpo.share_prefix" in ok


def _row(key, group, pps, e2e, layout=(2, 1), tokens=(400.0, 180.0)):
    return {"key": key, "group": group, "name": key, "pairs_per_s": pps, "e2e_s": e2e, "layout": list(layout),
            "input_tokens_per_pair": tokens[0], "scored_tokens_per_pair": tokens[1]}


def test_verdicts_compare_with_trls_best_layout_averaged_over_its_runs():
    """TRL best is the layout with the most pairs/s, its runs before and after raydpo averaged; the
    all-off row is judged against TRL in its own layout; end to end the quicker TRL command counts."""
    results = [_row("trl-1x2", "trl", 6.0, 80.0, (1, 2)), _row("trl-2x1", "trl", 7.0, 90.0),
               _row("default", "raydpo", 15.0, 70.0), _row("all-off", "raydpo", 6.9, 100.0),
               _row("no-share-prefix", "ablations", 12.0, 75.0, tokens=(440.0, 180.0)),  # counts off by 10%
               _row("trl-2x1", "trl", 8.0, 90.0)]
    ref = peer.add_ratios(results, workers=2)
    assert ref["best"] == "trl-2x1" and ref["best_runs"]["pairs_per_s"] == 7.5
    assert results[2]["ratio"] == 2.0 and results[4]["ratio"] is None
    lines = {v["what"]: v for v in peer.verdicts(results, ref, steps=50)}
    assert lines["raydpo default vs TRL best, steady state"]["status"] == "MET"
    e2e = lines["raydpo default vs TRL best, end to end"]
    assert e2e["value"] == pytest.approx(80 / 70) and e2e["status"] == "MISSED"  # trl-1x2 was quicker
    off = lines["raydpo all fast paths off vs TRL same layout, steady state"]
    assert off["value"] == pytest.approx(6.9 / 7.5) and off["status"] == "MISSED"


def test_raydpo_default_runs_twice_like_trl_best_and_its_verdicts_use_the_means(monkeypatch, tmp_path):
    """With other rows between, raydpo's default and TRL best each run again at the end (a machine
    that drifts during the run weighs on both alike); the headline verdicts use each one's mean."""
    rows = peer.select(peer.all_rows(2, 8, 2), "trl-2x1,default,all-off")
    speeds = iter([7.0, 15.0, 8.0, 17.0, 8.0])  # trl, default, all-off, default again, trl again
    ran = []

    def fake(kind):
        def run(args, setup, row, tag=None):
            ran.append((row.key, tag))
            return {"pairs_per_s": next(speeds), "e2e_s": 60.0 if kind == "raydpo" else 84.0,
                    "input_tokens_per_pair": 400.0, "scored_tokens_per_pair": 180.0, "peak_rss_mib": 1.0,
                    "tokens_per_s": 1.0}
        return run

    monkeypatch.setattr(peer, "run_trl", fake("trl"))
    monkeypatch.setattr(peer, "run_raydpo", fake("raydpo"))
    results = peer.run_rows(None, None, rows)
    assert [k for k, _ in ran] == ["trl-2x1", "default", "all-off", "default", "trl-2x1"]
    assert len({t for _, t in ran}) == 5  # each run its own scratch folder
    ref = peer.add_ratios(results, workers=2)
    lines = {v["what"]: v for v in peer.verdicts(results, ref, steps=50)}
    steady = lines["raydpo default vs TRL best, steady state"]
    assert steady["value"] == pytest.approx(16.0 / 7.5) and "means of 2 and 2 runs" in steady["line"]
    assert lines["raydpo default vs TRL best, end to end"]["value"] == pytest.approx(84.0 / 60.0)

