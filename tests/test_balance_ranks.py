"""``dpo.balance_ranks``: each global micro-batch's pairs are dealt to the workers by tokens. The
step is the same (the same pairs, the same per-worker count, so the same global mean), the
workers' loads come out closer, and the deal is a pure function every rank computes alike."""

import numpy as np
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo, pair_cost, rank_cost
from raydpo.data.order import balanced_share, rank_batches
from raydpo.data.rows import format_prompt
from raydpo.data.sample import generate_rows
from raydpo.data.tokenize import tokenize_dpo
from raydpo.data.tokenizer import load_tokenizer
from raydpo.models.factory import load_model, resolve_model_path
from raydpo.train.loop import dpo_forward


@pytest.mark.parametrize("world,per", [(2, 4), (3, 2), (4, 1), (2, 1)])
def test_every_pair_goes_to_one_worker_each_gets_as_many_and_loads_come_out_closer(world, per):
    rng = np.random.default_rng(0)
    spreads = {"contiguous": [], "balanced": []}
    for _ in range(50):
        costs = rng.integers(50, 500, size=world * per)
        shares = [balanced_share(costs, world, r) for r in range(world)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(world * per))
        assert all(len(s) == per for s in shares)
        assert [balanced_share(costs, world, r).tolist() for r in range(world)] == [s.tolist() for s in shares]
        spreads["balanced"].append(np.ptp([costs[s].sum() for s in shares]))
        spreads["contiguous"].append(np.ptp(costs.reshape(world, per).sum(1)))
    if per > 1:  # one pair each leaves nothing to balance
        assert np.mean(spreads["balanced"]) < 0.5 * np.mean(spreads["contiguous"])


def test_the_workers_batches_are_the_global_micro_batch_whatever_the_deal():
    rows = {"row_id": np.arange(16), "prompt_input_ids": np.array([[1] * (i % 5 + 1) for i in range(16)] + [None],
                                                                   dtype=object)[:-1]}
    rows["chosen_input_ids"] = rows["rejected_input_ids"] = rows["prompt_input_ids"]

    def stream(n):
        for lo in range(0, 16, n):
            yield {k: v[lo:lo + n] for k, v in rows.items()}

    cost = rank_cost("dpo", Config().dpo)
    seen = [list(rank_batches(stream, 4, 2, r, lambda b: b["row_id"].tolist(), cost=cost)) for r in range(2)]
    for i in range(2):
        assert sorted(seen[0][i] + seen[1][i]) == list(range(8 * i, 8 * i + 8))
    assert rank_cost("sft", Config().dpo) is None
    assert rank_cost("dpo", Config().with_overrides({"dpo.balance_ranks": False}).dpo) is None
    b = {k: rows[k][:3] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
    assert pair_cost(b, True).tolist() == [3, 6, 9] and pair_cost(b, False).tolist() == [4, 8, 12]


def test_a_balanced_step_gives_the_contiguous_steps_loss_and_gradients(tiny_cache):
    """Two workers' mean losses averaged (DeepSpeed averages their gradients): the same numbers
    for the contiguous and the balanced deal of the same 8 pairs."""
    cfg = Config().with_overrides({"model.cache_dir": tiny_cache, "quantization.mode": "none", "lora.dropout": 0.0})
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    rows = generate_rows(8, seed=2)
    ids = tokenize_dpo(tok, [format_prompt(r["question"][: 20 + 40 * i], cfg.data.prompt_template) for i, r in enumerate(rows)],
                       [r["response_j"][: 30 + 30 * i] for i, r in enumerate(rows)],
                       [r["response_k"][: 250 - 25 * i] for i, r in enumerate(rows)], 160, 64)
    cols = {k: np.array(v + [None], dtype=object)[:-1] for k, v in ids.items() if k.endswith("_input_ids")}
    torch.manual_seed(0)
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    costs = pair_cost(cols, cfg.dpo.share_prefix)
    deals = {"contiguous": [np.arange(0, 4), np.arange(4, 8)],
             "balanced": [balanced_share(costs, 2, r) for r in range(2)]}
    assert deals["balanced"][0].tolist() != [0, 1, 2, 3]  # the deal does move pairs
    out = {}
    for name, shares in deals.items():
        model.zero_grad(set_to_none=True)
        total = 0.0
        for s in shares:
            b = collate_dpo({k: v[s] for k, v in cols.items()}, tok.pad_token_id, share_prefix=cfg.dpo.share_prefix,
                            pack=cfg.dpo.padding_free)
            loss, _ = dpo_forward(model, model, b, cfg)
            (loss / 2).backward()
            total += loss.item() / 2
        out[name] = total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    (l0, g0), (l1, g1) = out["contiguous"], out["balanced"]
    assert abs(l0 - l1) < 1e-5 and abs(l0 - np.log(2)) > 1e-4  # a trained-looking adapter: not ln 2
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rows,world,per,max_batches", [(33, 2, 4, None), (8, 2, 4, 1), (10, 4, 2, None), (3, 4, 1, None)])
def test_each_rank_evaluates_its_own_equal_share_of_the_eval_split_read_whole(rows, world, per, max_batches):
    """`rank_eval_batches`: every rank reads the whole eval split in the same order and takes its
    slice; no row is evaluated twice, the ranks run the same number of batches of the same sizes
    (ZeRO-3's gathers need it), and only a short tail of fewer than ``world`` rows is left out."""
    from raydpo.data.order import rank_eval_batches

    ids = np.arange(100, 100 + rows)

    def stream(n):
        return ({"row_id": ids[i:i + n]} for i in range(0, rows, n))

    def ranks_rows(rank):
        got = [b["row_id"].tolist() for b in rank_eval_batches(stream, per, world, rank, lambda b: b)]
        return got[:max_batches] if max_batches else got

    shares = [ranks_rows(r) for r in range(world)]
    assert len({tuple(len(b) for b in s) for s in shares}) == 1  # the same batches, the same sizes on every rank
    seen = [i for s in shares for b in s for i in b]
    assert len(seen) == len(set(seen))
    expected = min(rows, max_batches * per * world) if max_batches else rows
    assert expected - world < len(seen) <= expected
