"""Exact resume, in-process (one gloo rank, DeepSpeed ZeRO-2, fp32 CPU, LoRA dropout on): a run
stopped by a preemption at step 3 and resumed from its checkpoint ends with the same adapter and
the same metrics as one that never stopped; a non-finite loss is skipped without touching the
weights, optimizer or scheduler; too many in a row stop with a message naming the step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
from raydpo.data.order import rank_batches
from raydpo.train.checkpoint import CheckpointError, verify_checkpoint
from raydpo.train.engine import WorkerEnv
from raydpo.train.loop import Hooks, NonFiniteError, run_stage

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_cache, gloo):
    cfg = Config().with_overrides({
        "model.cache_dir": tiny_cache, "dpo.max_steps": STEPS, "dpo.per_device_batch_size": 2,
        "dpo.gradient_accumulation_steps": 2, "dpo.log_every": 1, "dpo.eval_every": 3, "dpo.save_every": 2,
        "dpo.lr": 5e-3, "dpo.reference": "adapter_disabled", "lora.dropout": 0.1, "scaling.num_workers": 1,
        "dpo.max_nonfinite_steps": 3,
    })
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    rows = generate_rows(24, seed=5)
    cols = tokenize_dpo(tok, [format_prompt(r["question"][:200], cfg.data.prompt_template) for r in rows],
                        [r["response_j"][:200] for r in rows], [r["response_k"][:200] for r in rows], 128, 64)
    return cfg, path, tok, {k: np.array(v + [None], dtype=object)[:-1] for k, v in cols.items()}


def _run(setup, tmp: Path, *, resume_dir=None, stop_after=None, faults="", overrides=None, stop_requested=None):
    cfg, path, tok, cols = setup
    cfg = cfg.with_overrides(overrides or {})
    d = cfg.dpo
    torch.manual_seed(0)  # the fresh adapter's init
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path)
    n, g = len(cols["row_id"]), d.per_device_batch_size
    stream = np.concatenate([epoch_order(cols["row_id"].astype(np.int64), cfg.data.seed, e)[:usable_rows(n, g)]
                             for e in range(epochs_needed(n, g, d.max_steps * d.gradient_accumulation_steps))])

    def collate(b):
        return collate_dpo(b, tok.pad_token_id, share_prefix=d.share_prefix, pack=d.padding_free)

    def numpy_batches(size):
        for lo in range(0, len(stream) - size + 1, size):
            yield {k: v[stream[lo:lo + size]] for k, v in cols.items()}

    saved, logged, calls = {}, [], [0]

    def report(metrics, ckpt):
        if ckpt:
            dest = tmp / f"checkpoint_step{int(metrics['step'])}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(ckpt, dest)
            saved[int(metrics["step"])] = dest

    def stop():
        calls[0] += 1
        return stop_after is not None and calls[0] >= stop_after

    hooks = Hooks(train_batches=lambda skip: rank_batches(numpy_batches, g, 1, 0, collate, skip),
                  eval_batches=lambda: iter([collate({k: v[:4] for k, v in cols.items()})]),
                  report=report, log=lambda m, s: logged.append((s, m)), resume_dir=resume_dir,
                  progress=lambda s: None, stop_requested=stop_requested or stop, config_fingerprint={"x": 1},
                  faults=faults,
                  faults_dir=str(tmp / "fired"))
    result = run_stage("dpo", cfg, model, tok, WorkerEnv(0, 1, torch.device("cpu"), False), hooks)
    lora = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return result, lora, saved, dict(logged)


def test_a_preempted_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(setup, tmp_path):
    full, full_lora, full_saved, full_log = _run(setup, tmp_path / "full")
    assert sorted(full_saved) == [2, 4, 6]  # every save_every step, logged or not, and the end

    cut, _, cut_saved, cut_log = _run(setup, tmp_path / "cut", stop_after=3)
    assert cut.preempted and cut.step == 3 and sorted(cut_saved) == [2, 3]  # checkpointed at once on the stop
    state = verify_checkpoint(cut_saved[3])
    assert state["preempted"] and state["micro_batches"] == 6 and state["config"] == {"x": 1}

    resumed, res_lora, _, res_log = _run(setup, tmp_path / "res", resume_dir=str(cut_saved[3]))
    assert resumed.step == STEPS and sorted(res_log) == [4, 5, 6]  # it went on from step 4, not from 1
    for k in full_lora:
        torch.testing.assert_close(res_lora[k], full_lora[k], rtol=1e-4, atol=1e-4)
    for step in (4, 5, 6):
        for key in ("train/loss", "train/rewards/margins", "train/lr"):
            assert res_log[step][key] == pytest.approx(full_log[step][key], rel=1e-4, abs=1e-4), (step, key)
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        assert res_log[6][key] == pytest.approx(full_log[6][key], rel=1e-4, abs=1e-4)
    assert cut_log[3]["train/loss"] == pytest.approx(full_log[3]["train/loss"], rel=1e-6)


def test_a_cpu_run_compiles_no_deepspeed_op(setup, tmp_path):
    """DeepSpeed on CPU would compile its shared-memory all-reduce op with gcc the first time its
    comm backend starts (~45 s on 2 cores); raydpo never calls the op, so no run builds or loads it."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.ops.op_builder.builder import OpBuilder

    result, *_ = _run(setup, tmp_path, overrides={"dpo.max_steps": 1, "dpo.save_every": 1})
    assert result.step == 1  # trained through DeepSpeed's engine and comm backend
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
    assert OpBuilder._loaded_ops == {}  # no op built or loaded in this process


def test_gradient_accumulation_through_the_engine_equals_one_batch_of_the_same_pairs(setup, tmp_path):
    # 2 pairs x 2 accumulated micro-batches and 1 batch of 4 see the same 4 pairs per optimizer
    # step: the loop's loss reduction and DeepSpeed's accumulation (loss scaling, when the engine
    # steps) must leave the same adapter and log the same metrics. Dropout off: the two runs draw
    # their masks in a different order.
    same = {"lora.dropout": 0.0, "dpo.max_steps": 2, "dpo.save_every": 2}
    _, big, _, big_log = _run(setup, tmp_path / "big", overrides={
        **same, "dpo.per_device_batch_size": 4, "dpo.gradient_accumulation_steps": 1})
    _, acc, _, acc_log = _run(setup, tmp_path / "acc", overrides={
        **same, "dpo.per_device_batch_size": 2, "dpo.gradient_accumulation_steps": 2})
    assert any(v.abs().sum() > 0 for k, v in big.items() if "lora_B" in k)  # the adapter moved off its zero init
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-5)
    for step in (1, 2):
        for key in ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen"):
            assert acc_log[step][key] == pytest.approx(big_log[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_a_damaged_or_half_written_checkpoint_is_refused(setup, tmp_path):
    _, _, saved, _ = _run(setup, tmp_path, overrides={"dpo.max_steps": 2})
    ck = saved[2]
    verify_checkpoint(ck)
    blob = next(p for p in (ck / "deepspeed").rglob("*optim_states.pt"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        verify_checkpoint(ck)
    (ck / "manifest_r0.json").unlink()  # as if the rank died before its last write
    with pytest.raises(CheckpointError, match="half-written"):
        verify_checkpoint(ck)


# ZeRO's own overflow skip, and the loop's without ZeRO (DeepSpeed stage 0, and no DeepSpeed at all)
@pytest.mark.parametrize("zero", [0, 2, "plain"])
def test_a_non_finite_step_consumes_its_batch_without_any_update(setup, tmp_path, zero):
    # NaN on the last micro-batch of step 2: step 2's first micro-batch was already backpropagated
    z = {"deepspeed.enabled": False} if zero == "plain" else {"deepspeed.stage": zero}
    _, nan_lora, _, nan_log = _run(setup, tmp_path / "nan", faults="nan@2", overrides={"dpo.max_steps": 2, **z})
    _, one_lora, _, one_log = _run(setup, tmp_path / "one", overrides={"dpo.max_steps": 1, **z})
    for k in one_lora:  # weights after the skipped step 2 are those after step 1
        torch.testing.assert_close(nan_lora[k], one_lora[k], rtol=0, atol=0)
    assert nan_log[2]["train/nonfinite_steps"] == 1 and one_log[1]["train/nonfinite_steps"] == 0
    assert nan_log[2]["train/lr"] == nan_log[1]["train/lr"]  # the scheduler did not step either
    # and the skipped step's batch was consumed: step 3 trains on the pairs step 3 always gets. The
    # reference (adapter off) log-probs, logps - rewards / beta, identify the pairs of a step
    beta = setup[0].dpo.beta
    _, _, _, skip3 = _run(setup, tmp_path / "nan3", faults="nan@2", overrides={"dpo.max_steps": 3, **z})
    _, _, _, plain3 = _run(setup, tmp_path / "plain3", overrides={"dpo.max_steps": 3, **z})

    def ref(log, step):
        return log[step]["train/logps/chosen"] - log[step]["train/rewards/chosen"] / beta

    assert ref(skip3, 3) == pytest.approx(ref(plain3, 3), rel=1e-4, abs=1e-4)
    assert ref(skip3, 3) != pytest.approx(ref(plain3, 2), rel=1e-4, abs=1e-4)


def test_too_many_non_finite_steps_in_a_row_stop_naming_the_step_and_the_last_checkpoint(setup, tmp_path):
    with pytest.raises(NonFiniteError) as e:
        _run(setup, tmp_path, faults="nanrun@3")
    msg = str(e.value)
    # steps 3-5 were skipped; the step-4 checkpoint still holds step 2's weights (skips change nothing)
    assert "3 steps in a row" in msg and "at step 5" in msg and "checkpoint is step 4" in msg
    assert "lr" in msg and "fp16" in msg and "data" in msg
    assert json.loads((tmp_path / "checkpoint_step4" / "trainer_state.json").read_text())["nonfinite_run"] == 2


def test_gradient_checkpointing_trains_padding_free_rows_like_the_plain_backward(setup, tmp_path):
    """The GPU recipe's setting (model.gradient_checkpointing) with the default padding-free rows:
    the layers are recomputed inside the backward, with the batch's per-sequence attention (before
    the loop held that scope open, the recompute ran sdpa and torch's checkpoint failed on the
    first step). Same losses and LoRA weights as without checkpointing."""
    base = {"dpo.max_steps": 2, "lora.dropout": 0.0}
    plain, plain_lora, _, plain_log = _run(setup, tmp_path / "plain", overrides=base)
    ckpt, ckpt_lora, _, ckpt_log = _run(setup, tmp_path / "ckpt", overrides={**base, "model.gradient_checkpointing": True})
    assert setup[0].dpo.padding_free and ckpt.step == plain.step == 2
    for step in (1, 2):
        assert ckpt_log[step]["train/loss"] == pytest.approx(plain_log[step]["train/loss"], rel=1e-4, abs=1e-5)
    for k in plain_lora:
        torch.testing.assert_close(ckpt_lora[k], plain_lora[k], rtol=1e-4, atol=1e-5)


def test_the_plain_engine_without_deepspeed_gives_deepspeeds_losses_and_weights(setup, tmp_path):
    """``deepspeed.enabled: false`` (the GPU check's host has no DeepSpeed) is the fast-to-install
    path, not another training: the same losses, metrics, learning rates and LoRA weights as the
    DeepSpeed ZeRO-2 engine, step by step (accumulation 2, clipping, LoRA dropout on), and its
    checkpoint resumes it exactly."""
    over = {"dpo.max_steps": 3, "dpo.save_every": 3, "dpo.max_grad_norm": 0.05}  # a norm that clips
    ds, ds_lora, _, ds_log = _run(setup, tmp_path / "ds", overrides=over)
    pl, pl_lora, pl_saved, pl_log = _run(setup, tmp_path / "pl", overrides={**over, "deepspeed.enabled": False})
    assert ds.step == pl.step == 3 and sorted(pl_log) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("train/loss", "train/rewards/margins", "train/logps/chosen", "train/lr"):
            assert pl_log[step][key] == pytest.approx(ds_log[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert pl_log[1]["train/loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert pl_log[3]["train/loss"] != pytest.approx(pl_log[1]["train/loss"], abs=1e-4)  # it did train
    for k in ds_lora:
        torch.testing.assert_close(pl_lora[k], ds_lora[k], rtol=1e-5, atol=1e-6)
    assert (pl_saved[3] / "adapter" / "adapter_model.safetensors").exists()  # the same adapter folder
    # a plain checkpoint resumes a plain run: from step 1 on it ends where the uninterrupted one did
    _, _, cut_saved, _ = _run(setup, tmp_path / "cut", stop_after=1,
                              overrides={**over, "deepspeed.enabled": False})
    _, res_lora, _, res_log = _run(setup, tmp_path / "res", resume_dir=str(cut_saved[1]),
                                   overrides={**over, "deepspeed.enabled": False})
    assert sorted(res_log) == [2, 3]
    for k in pl_lora:
        torch.testing.assert_close(res_lora[k], pl_lora[k], rtol=1e-5, atol=1e-6)


def test_the_plain_engine_backward_gives_deepspeeds_gradients(setup):
    """One micro-batch's gradients of every LoRA weight, plain torch against DeepSpeed ZeRO-2
    (DeepSpeed keeps them in its own partitioned buffers: read back with ``safe_get_full_grad``)."""
    from deepspeed.utils import safe_get_full_grad

    from raydpo.models.pairs import packed_attention
    from raydpo.train.engine import build_engine
    from raydpo.train.loop import dpo_forward

    cfg, path, tok, cols = setup
    cfg = cfg.with_overrides({"dpo.gradient_accumulation_steps": 1, "lora.dropout": 0.0})
    batch = collate_dpo({k: v[:2] for k, v in cols.items()}, tok.pad_token_id, share_prefix=True, pack=True)
    grads = {}
    for enabled in (True, False):
        c = cfg.with_overrides({"deepspeed.enabled": enabled})
        torch.manual_seed(0)
        model = load_model(c.model, c.quantization, c.lora, base_path=path)
        with torch.no_grad():  # a non-zero lora_B, so that lora_A's gradient is not zero too
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.01)
        engine, _, _ = build_engine(model, c, c.dpo, WorkerEnv(0, 1, torch.device("cpu"), False))
        engine.train()
        with packed_attention(engine, batch):
            loss, _ = dpo_forward(engine, model, batch, c)
            engine.backward(loss)
        get = safe_get_full_grad if enabled else (lambda p: p.grad)
        grads[enabled] = {n: get(p).clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads[True]) == set(grads[False]) and len(grads[True]) == 2 * 2 * setup[0].model.tiny.num_hidden_layers
    assert all(float(g.abs().sum()) > 0 for g in grads[False].values())
    for n in grads[True]:
        torch.testing.assert_close(grads[False][n], grads[True][n], rtol=1e-5, atol=1e-7)


def test_the_plain_engine_drops_a_step_whose_gradients_are_not_finite():
    """A finite loss with non-finite gradients (ZeRO's overflow case): no update, no scheduler step."""
    from raydpo.train.engine import build_engine

    net = torch.nn.Linear(3, 1)
    cfg = Config().with_overrides({"deepspeed.enabled": False, "dpo.gradient_accumulation_steps": 1,
                                   "dpo.warmup_steps": 2})
    engine, _, sched = build_engine(net, cfg, cfg.dpo, WorkerEnv(0, 1, torch.device("cpu"), False))
    before, lr = net.weight.detach().clone(), sched.get_last_lr()[0]
    hook = net.weight.register_hook(lambda g: g * float("nan"))
    engine.backward(engine(torch.ones(2, 3)).sum())
    engine.step()
    assert engine.skipped_steps == 1 and torch.equal(net.weight, before) and sched.get_last_lr()[0] == lr
    assert net.weight.grad is None  # cleared: the next step starts clean
    hook.remove()
    engine.backward(engine(torch.ones(2, 3)).sum())
    engine.step()
    assert engine.skipped_steps == 1 and not torch.equal(net.weight, before) and sched.get_last_lr()[0] > lr


def test_a_node_drain_notice_checkpoints_and_stops_like_sigterm(setup, tmp_path):
    """Ray's drain notice (`ray.train.PreemptionInfo`, here as Ray Train's watcher would leave it
    on the worker) is read between steps: the step it appears at is checkpointed and the run stops."""
    from ray.train import PreemptionInfo

    from raydpo.train.preempt import StopWatch

    steps, said = [0], []

    def notice():
        steps[0] += 1
        return PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"ab12cd34ef": [0]}) if steps[0] >= 3 else None

    watch = StopWatch(None, drain=notice, say=said.append)
    try:
        cut, _, saved, _ = _run(setup, tmp_path / "drain", stop_requested=watch.requested)
    finally:
        watch.close()
    assert cut.preempted and cut.step == 3 and sorted(saved) == [2, 3]
    assert verify_checkpoint(saved[3])["preempted"]
    assert said == ["[preempt] Ray drains node ab12cd34 (ranks 0): checkpointing at the end of this step"]
