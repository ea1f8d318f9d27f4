"""The 4-bit SFT reference (`raydpo.benchmarks.nf4_reference`): DPO's merged reference equals the SFT
model only without quantization; under NF4 the merge moves every scored token."""

import numpy as np
import pytest
import torch

from raydpo.benchmarks import nf4_reference as bench
from raydpo.config import Config
from raydpo.data.collate import collate_dpo
from raydpo.data.rows import format_prompt
from raydpo.data.sample import generate_rows
from raydpo.data.tokenize import tokenize_dpo
from raydpo.data.tokenizer import load_tokenizer
from raydpo.models.factory import load_model, resolve_model_path
from policies import trained_looking_policy


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_cache):
    # the demo's numerics on CPU: NF4 with fp32 compute; vocab 300 keeps the tokenizer build short
    return Config().with_overrides({
        "model.cache_dir": tiny_cache, "model.tiny.vocab_size": 300,
        "quantization.mode": "4bit", "quantization.compute_dtype": "float32", "lora.dropout": 0.0,
        "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})


@pytest.fixture(scope="module")
def base(cfg):
    return resolve_model_path(cfg.model)


@pytest.fixture(scope="module")
def sft_adapter(cfg, base, tmp_path_factory):
    """An SFT adapter with a LoRA update of the size a short SFT run of the demo gives (rms ~3e-3),
    saved as training saves it."""
    model = trained_looking_policy(cfg, base, seed=1, scale=0.01)
    out = tmp_path_factory.mktemp("sft") / "adapter"
    model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def batches(cfg, base):
    """Eight held-out-like pairs in the DPO default layout (shared prefix, padding-free), two batches."""
    tok = load_tokenizer(base)
    rows = generate_rows(8, seed=3)
    ids = tokenize_dpo(tok, [format_prompt(r["question"], cfg.data.prompt_template) for r in rows],
                       [r["response_j"] for r in rows], [r["response_k"] for r in rows], 128, 64)
    cols = {k: np.array(v + [None], dtype=object)[:-1] for k, v in ids.items() if k.endswith("_input_ids")}
    return [collate_dpo({k: v[lo:lo + 4] for k, v in cols.items()}, tok.pad_token_id,
                        share_prefix=cfg.dpo.share_prefix, pack=cfg.dpo.padding_free) for lo in (0, 4)]


def test_captured_token_logps_are_the_ones_dpo_sums(cfg, base, sft_adapter, batches):
    """The per-token numbers the measurement compares add up, per response, to `pair_logps`' sums."""
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=base, adapter_path=sft_adapter,
                       trainable=False).eval()
    s = bench.score(model, batches, adapter=True)
    per_response = torch.zeros_like(s.sums).index_add(0, torch.repeat_interleave(
        torch.arange(len(s.counts)), s.counts), s.tokens)
    # the batches' slots, chosen then rejected per batch: the same order as the sums
    assert s.tokens.numel() == int(s.counts.sum()) > 100
    torch.testing.assert_close(per_response, s.sums, rtol=0, atol=1e-4)


def test_step0_metrics_pair_each_chosen_with_its_rejected(cfg):
    """Hand-computed: β = 0.1, policy − reference = 0.5, 0 on the chosen and 0, 1 on the rejected
    responses: rewards/chosen 0.025, rewards/rejected 0.05, margins −0.025, accuracy 1/2."""
    t = lambda *v: torch.tensor(v)  # noqa: E731
    counts = t(2, 2, 2, 2)
    policy = bench.Scores(t(-1.0, -2.0, -3.0, -4.0), counts, torch.zeros(8))
    reference = bench.Scores(t(-1.5, -2.0, -3.0, -5.0), counts, torch.zeros(8))
    m = bench.step0_metrics(policy, reference, cfg)
    assert m["rewards/chosen"] == pytest.approx(0.025) and m["rewards/rejected"] == pytest.approx(0.05)
    assert m["rewards/margins"] == pytest.approx(-0.025) and m["rewards/accuracies"] == pytest.approx(0.5)


def test_merged_reference_is_the_sft_model_in_fp32_but_not_under_nf4(cfg, base, sft_adapter, batches, tmp_path):
    """DPO's reference after SFT is the SFT adapter merged into the base and reloaded: in fp32 it is
    the SFT model to float precision (rewards 0 at step 0 with the SFT model as the policy); under
    NF4 the merge requantizes W + ΔW, and every token's log-prob moves — the bias the benchmark
    measures (`python -m raydpo.benchmarks.nf4_reference`)."""
    fp32 = bench.compare(cfg.with_overrides({"quantization.mode": "none"}), base, sft_adapter, tmp_path / "m32",
                         batches)
    assert fp32["tok_abs"] < 1e-5 and fp32["sum_abs"] < 1e-4
    assert all(abs(fp32[f"step0 rewards/{k}"]) < 1e-5 for k in ("chosen", "rejected", "margins"))

    nf4 = bench.compare(cfg, base, sft_adapter, tmp_path / "m4", batches)
    assert nf4["tok_abs"] > 1e-3 and nf4["sum_abs"] > 1e-2  # not float noise: 100x and more above fp32's
    assert abs(nf4["step0 rewards/chosen"]) > 1e-4 or abs(nf4["step0 rewards/rejected"]) > 1e-4
    # in weight space the reference is NF4(W + ΔW), not NF4(W) + ΔW: a gap of the order of ΔW itself
    assert 0 < nf4["codes_changed"] < 1 and nf4["gap"] > 0.1 * nf4["delta"] > 0


# -- dpo.sft_reference: adapter — the SFT adapter itself as the policy, a frozen copy as the reference --


@pytest.fixture(scope="module")
def adapter_cfg(cfg, sft_adapter, tmp_path_factory):
    return cfg.with_overrides({"dpo.sft_adapter": sft_adapter, "dpo.sft_reference": "adapter",
                               "run.storage_path": str(tmp_path_factory.mktemp("runs"))})


def _sums(model, batches, *, reference: bool) -> torch.Tensor:
    from raydpo.models.pairs import pair_logps, reference_logps

    out = []
    for b in batches:
        c, r = reference_logps(model, b) if reference else pair_logps(model, b)[:2]
        out.append(torch.cat([c, r]).detach())
    return torch.cat(out)


def test_with_the_adapter_reference_the_step0_policy_is_its_reference_exactly_under_4bit(
        cfg, adapter_cfg, base, sft_adapter, batches, tmp_path):
    """The policy is the SFT adapter on the NF4 base — the SFT model as trained — and the reference
    a frozen copy: at step 0 (training mode, gradients on) their log-probs are equal bit for bit,
    so DPO's rewards are exactly 0. The merged reference differs from that same SFT model by the
    amount the benchmark measures. A training step moves the policy, never the reference."""
    from raydpo import losses
    from raydpo.models.factory import load_stage_model
    from raydpo.models.pairs import REF_ADAPTER, pair_logps

    policy = load_stage_model(adapter_cfg, "dpo", base_path=base).train()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # the copy is frozen
    assert {n.replace(".default.", f".{REF_ADAPTER}.") for n in trainable} <= {n for n, _ in policy.named_parameters()}

    pol, ref = _sums(policy, batches, reference=False), _sums(policy, batches, reference=True)
    assert torch.equal(pol, ref)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable  # flags restored
    half = pol.shape[0] // 2
    _, chosen, rejected = losses.dpo_loss(pol[:half], pol[half:], ref[:half], ref[half:], beta=0.1)
    assert torch.equal(chosen, torch.zeros_like(chosen)) and torch.equal(rejected, torch.zeros_like(rejected))
    # the policy is the SFT model as SFT trained it (the SFT adapter on the NF4 base) ...
    sft = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=base, adapter_path=sft_adapter,
                     trainable=False).train()
    assert torch.equal(_sums(sft, batches, reference=False), pol)
    # ... which the merged reference is not: NF4(W + ΔW) moves every token (test above; the benchmark's numbers)
    merged = bench.compare(cfg, base, sft_adapter, tmp_path / "m4", batches)
    assert merged["tok_abs"] > 1e-3

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    c, r, _, _ = pair_logps(policy, batches[0])
    (-(c - r).mean()).backward()
    opt.step()
    assert not torch.equal(_sums(policy, batches, reference=False), pol)
    assert torch.equal(_sums(policy, batches, reference=True), ref)


def test_the_precomputed_reference_scores_the_step0_policy(adapter_cfg, base, batches):
    """`RefLogps` (the Ray Data reference pass) loads the model as a worker does and stores the
    step-0 policy's own sums: the SFT adapter's, not the base's."""
    from raydpo.models.factory import load_stage_model
    from raydpo.orchestration.reference import REF_COLUMNS, RefLogps

    scorer = RefLogps(adapter_cfg.to_dict(), base)
    from_base = RefLogps(adapter_cfg.with_overrides({"dpo.sft_adapter": None}).to_dict(), base)  # DPO from the base
    policy = load_stage_model(adapter_cfg, "dpo", base_path=base).eval()
    for b in batches:
        rows = _pairs_table(b)
        out = scorer(rows)
        want = _sums(policy, [b], reference=False)
        assert torch.equal(torch.tensor(out[REF_COLUMNS[0]].to_pylist() + out[REF_COLUMNS[1]].to_pylist()), want)
        base_only = from_base(rows)
        assert not torch.allclose(torch.tensor(base_only[REF_COLUMNS[0]].to_pylist()), want[:len(rows)], atol=1e-3)


def _pairs_table(b):
    """The DPO token columns of a collated batch (shared prefix, padding-free) back as a pyarrow
    table, `RefLogps`' input."""
    import pyarrow as pa

    assert "spans" in b, "the default layout is padding-free"
    ids = b["input_ids"][0].tolist()
    cols = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}
    for start, p, c, r in b["spans"].tolist():
        seq = ids[start:start + p + c + r]
        cols["prompt_input_ids"].append(seq[:p])
        cols["chosen_input_ids"].append(seq[p:p + c])
        cols["rejected_input_ids"].append(seq[p + c:])
    return pa.table(cols)


def _run_dpo(cfg, base, cols, tmp, resume_dir=None):
    """DPO in-process (one gloo rank, DeepSpeed ZeRO-2, as a Ray worker runs it): (result, the
    trained adapter's weights, {step: checkpoint folder})."""
    import shutil

    from raydpo.data.order import epoch_order, rank_batches
    from raydpo.models.factory import load_stage_model
    from raydpo.train.engine import WorkerEnv
    from raydpo.train.loop import Hooks, run_stage

    tok = load_tokenizer(base)
    d = cfg.dpo
    model = load_stage_model(cfg, "dpo", base_path=base)
    stream = epoch_order(cols["row_id"].astype(np.int64), cfg.data.seed, 0)

    def collate(b):
        return collate_dpo(b, tok.pad_token_id, share_prefix=d.share_prefix, pack=d.padding_free)

    def numpy_batches(size):
        for lo in range(0, len(stream) - size + 1, size):
            yield {k: v[stream[lo:lo + size]] for k, v in cols.items()}

    saved = {}

    def report(metrics, ckpt):
        if ckpt:
            saved[int(metrics["step"])] = dest = tmp / f"step{int(metrics['step'])}"
            shutil.move(ckpt, dest)

    hooks = Hooks(train_batches=lambda skip: rank_batches(numpy_batches, d.per_device_batch_size, 1, 0, collate, skip),
                  eval_batches=lambda: iter([collate({k: v[:4] for k, v in cols.items()})]), report=report,
                  log=lambda m, s: None, resume_dir=resume_dir, progress=lambda s: None)
    result = run_stage("dpo", cfg, model, tok, WorkerEnv(0, 1, torch.device("cpu"), False), hooks)
    return result, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, saved, model


def test_dpo_from_the_sft_adapter_passes_step0_checkpoints_resumes_and_exports_onto_the_base(
        adapter_cfg, base, gloo, tmp_path):
    """A DPO run that trains the SFT adapter (per-step reference: the frozen copy) starts at exactly
    ln 2 with zero rewards (the step-0 check runs and holds), saves an adapter that is an adapter
    on the raw base (not on a merged model) and reproduces the trained policy there, and a run
    resumed from its step-2 checkpoint ends where the uninterrupted one does."""
    import json
    import math
    from pathlib import Path

    from raydpo.models.pairs import pair_logps

    cfg = adapter_cfg.with_overrides({
        "dpo.max_steps": 3, "dpo.per_device_batch_size": 2, "dpo.log_every": 1, "dpo.eval_every": 3,
        "dpo.save_every": 2, "dpo.lr": 5e-3, "dpo.reference": "adapter_disabled", "scaling.num_workers": 1})
    tok = load_tokenizer(base)
    rows = generate_rows(8, seed=5)
    ids = tokenize_dpo(tok, [format_prompt(r["question"][:200], cfg.data.prompt_template) for r in rows],
                       [r["response_j"][:200] for r in rows], [r["response_k"][:200] for r in rows], 128, 64)
    cols = {k: np.array(v + [None], dtype=object)[:-1] for k, v in ids.items()}

    full, lora, saved, model = _run_dpo(cfg, base, cols, tmp_path / "full")
    first = full.history[0]
    assert first["step"] == 1 and abs(first["train/loss"] - math.log(2)) < 1e-6
    assert first["train/rewards/chosen"] == first["train/rewards/rejected"] == first["train/rewards/margins"] == 0.0
    assert sorted(saved) == [2, 3]

    adapter = Path(saved[3]) / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    exported = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=base, adapter_path=str(adapter),
                          trainable=False).eval()
    b = collate_dpo({k: v[:4] for k, v in cols.items()}, tok.pad_token_id, share_prefix=True, pack=True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(pair_logps(exported, b)[0], pair_logps(model, b)[0])

    resumed, res_lora, _, _ = _run_dpo(cfg, base, cols, tmp_path / "res", resume_dir=str(saved[2]))
    assert resumed.step == 3 and [h["step"] for h in resumed.history if "train/loss" in h] == [3]
    for k in lora:
        torch.testing.assert_close(res_lora[k], lora[k], rtol=1e-5, atol=1e-6)


def test_stage_base_trains_the_adapter_on_the_base_without_a_merge_and_refuses_other_lora_settings(adapter_cfg):
    """With ``adapter`` DPO needs no merge: its base is the base SFT trained on (published into run
    storage), its tokenizer the SFT adapter's. The adapter's LoRA settings are the policy's, so a
    config whose ``lora.*`` differ is refused, naming each, rather than silently ignored."""
    from pathlib import Path

    from raydpo.config import ConfigError
    from raydpo.orchestration.base import resolve_base, sft_adapter_mismatch, stage_base

    said = []
    base_path, tok_path = stage_base(adapter_cfg, "dpo", said.append)
    assert (base_path, tok_path) == (resolve_base(adapter_cfg)[0], adapter_cfg.dpo.sft_adapter)
    assert not list(Path(adapter_cfg.run.storage_path).rglob("sft-merged")) and "frozen copy" in said[0]
    assert sft_adapter_mismatch(adapter_cfg) == []
    other = adapter_cfg.with_overrides({"lora.r": 4, "lora.target_modules": ["q_proj"]})
    assert [s.split(" is ")[0] for s in sft_adapter_mismatch(other)] == ["lora.r", "lora.target_modules"]
    with pytest.raises(ConfigError, match=r"lora\.r is 4 here, 8 in the adapter.*dpo\.sft_reference=merged"):
        stage_base(other, "dpo")


def test_the_reference_cache_and_the_resume_fingerprint_tell_the_two_references_apart(adapter_cfg, base, tmp_path):
    """The precomputed cache of the adapter reference is keyed on the SFT adapter's content (the
    base's alone is DPO from the base); a checkpoint written before ``dpo.sft_reference`` existed
    trained on the merged model, so resuming it as ``adapter`` is refused, and the key plays no
    part without an SFT adapter."""
    import shutil

    from raydpo.config.fingerprint import fingerprint_diff, resume_fingerprint
    from raydpo.models.factory import step0_dropout_reason
    from raydpo.orchestration.reference import cache_key

    from_base = adapter_cfg.with_overrides({"dpo.sft_adapter": None})
    key, parts = cache_key(adapter_cfg, base, base)
    assert key != cache_key(from_base, base, base)[0] and "sft_adapter" not in cache_key(from_base, base, base)[1]
    other = shutil.copytree(adapter_cfg.dpo.sft_adapter, tmp_path / "other")
    (other / "adapter_model.safetensors").write_bytes(b"another adapter")
    assert cache_key(adapter_cfg.with_overrides({"dpo.sft_adapter": str(other)}), base, base)[0] != key

    fp = resume_fingerprint(adapter_cfg)
    assert fp["dpo.sft_reference"] == "adapter" and "dpo.sft_reference" not in resume_fingerprint(from_base)
    older = {k: v for k, v in fp.items() if k != "dpo.sft_reference"}
    assert fingerprint_diff(older, fp) == ["dpo.sft_reference"]
    merged = adapter_cfg.with_overrides({"dpo.sft_reference": "merged"})
    assert fingerprint_diff(older, resume_fingerprint(merged)) == []

    # the step-0 check holds exactly unless the trained adapter drops out what its copy keeps
    assert step0_dropout_reason(adapter_cfg) is None
    assert "lora.dropout=0.05" in step0_dropout_reason(adapter_cfg.with_overrides({"lora.dropout": 0.05}))
    assert step0_dropout_reason(merged.with_overrides({"lora.dropout": 0.05})) is None
