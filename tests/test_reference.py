"""Precomputed reference log-probs give the same DPO losses as the on-the-fly reference."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydpo.config import Config
from raydpo.data.collate import collate_dpo
from raydpo.data.rows import format_prompt
from raydpo.data.sample import generate_rows
from raydpo.data.tokenize import tokenize_dpo
from raydpo.models import load_model, load_tokenizer, resolve_model_path
from raydpo.reference import RefLogps
from raydpo.train.loop import dpo_forward


@pytest.mark.parametrize("quant,loss_type", [("none", "sigmoid"), ("4bit", "sigmoid"), ("4bit", "ipo")])
def test_precomputed_reference_matches_on_the_fly(tmp_path, quant, loss_type):
    cfg = Config().with_overrides({"model.cache_dir": str(tmp_path), "quantization.mode": quant,
                                   "quantization.compute_dtype": "float32", "dpo.loss_type": loss_type})
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    rows = generate_rows(12, seed=5)
    ids = tokenize_dpo(tok, [format_prompt(r["question"], cfg.data.prompt_template) for r in rows],
                       [r["response_j"] for r in rows], [r["response_k"] for r in rows], 128, 64)
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in ids.items() if k != "truncated"})
    with_ref = RefLogps(cfg.to_dict(), path)(table)  # one big inference batch of 12

    torch.manual_seed(0)
    policy = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path)
    with torch.no_grad():  # a trained-looking adapter, so policy != reference
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    policy.eval()
    for lo in range(0, 12, 4):  # training batches of 4: different padding than the inference batch
        cols = {k: np.array(with_ref[k].to_pylist()[lo:lo + 4] + [None], dtype=object)[:-1]
                for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
        fly = collate_dpo(cols, tok.pad_token_id)
        pre = dict(fly, ref_chosen_logps=torch.tensor(with_ref["ref_chosen_logps"].to_pylist()[lo:lo + 4]),
                   ref_rejected_logps=torch.tensor(with_ref["ref_rejected_logps"].to_pylist()[lo:lo + 4]))
        with torch.no_grad():
            loss_fly, m_fly = dpo_forward(policy, policy, fly, cfg)
            loss_pre, m_pre = dpo_forward(policy, policy, pre, cfg)
        assert abs(loss_fly.item() - loss_pre.item()) < 1e-4
        for k in m_fly:
            assert abs(m_fly[k].item() - m_pre[k].item()) < 1e-4 * max(1.0, abs(m_fly[k].item())), k
        assert abs(m_fly["rewards/chosen"].item()) > 1e-4  # the comparison is not trivially 0 == 0


@pytest.mark.parametrize("resources,overrides,expected", [
    ({"CPU": 2.0}, {}, 2),  # 2 CPUs, 1 kept for Ray Data, 0.5 per replica
    ({"CPU": 16.0}, {"scaling.cpus_per_worker": 4.0}, 3),
    ({"CPU": 1.0}, {}, 1),  # never fewer than one replica
    ({"CPU": 64.0, "GPU": 8.0}, {"scaling.use_gpu": True}, 8),  # one per GPU, not per CPU
    ({"CPU": 64.0, "GPU": 8.0}, {"scaling.use_gpu": True, "scaling.gpus_per_worker": 2.0}, 4),
])
def test_reference_pass_uses_every_free_replica_slot(monkeypatch, resources, overrides, expected):
    import ray

    from raydpo.reference import inference_actors

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert inference_actors(Config().with_overrides(overrides)) == expected
