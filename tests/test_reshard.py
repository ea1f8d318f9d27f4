"""A checkpoint resumes on another number of workers (issue 26): the global batch stays the
checkpoint's (gradient accumulation adjusts, or one line names the numbers and the choices), the
data position is the same pair, and the LoRA adapter with its Adam moments is re-partitioned.

The rule (`raydpo.config.fingerprint.keep_global_batch`) and the stream position are pure and
checked against numbers worked out by hand. The engine part runs the real loop in gloo processes
(no Ray), DeepSpeed ZeRO-2 on fp32 CPU as the chaos config, and ZeRO-3 with every weight
partitioned: 2 workers -> 1 -> 2 across two resumes against 2 workers that never stopped."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from raydpo.config import Config, fingerprint_diff, resume_fingerprint
from raydpo.config.fingerprint import global_batch, keep_global_batch, resume_accumulation
from raydpo.data.order import rank_batches

STEPS = 6
PER_DEVICE = 2


# -- the rule: the global batch stays, the accumulation follows --------------------------------


@pytest.mark.parametrize("batch, per_device, workers, accum", [
    (8, 4, 2, 1), (8, 4, 1, 2), (8, 2, 1, 4), (8, 2, 4, 1), (12, 2, 3, 2), (12, 2, 2, 3), (16, 4, 4, 1)])
def test_the_accumulation_that_keeps_the_global_batch(batch, per_device, workers, accum):
    assert resume_accumulation("dpo", batch, per_device, workers) == accum
    assert per_device * workers * accum == batch


def test_a_global_batch_the_new_workers_cannot_make_is_one_line_naming_the_numbers_and_the_choices():
    # 8 pairs = 4 per device x 2 workers x 1: 3 workers would need 8 / 12 steps of accumulation
    with pytest.raises(ValueError) as e:
        resume_accumulation("dpo", 8, 4, 3)
    msg = str(e.value)
    assert "\n" not in msg and "cannot resume on 3 workers" in msg and "global batch is 8" in msg
    assert "4 x 3 workers = 12" in msg and "resume on 1 or 2 workers" in msg and "--restart" in msg
    # 12 = 4 x 3 x 1: on 2 workers 12 / 8 is not whole; 1 or 3 workers divide the 3 micro-batches
    assert "resume on 1 or 3 workers" in pytest.raises(ValueError, resume_accumulation, "sft", 12, 4, 2).value.args[0]


def _cfg(**kw) -> Config:
    return Config().with_overrides({"scaling.num_workers": 2, "dpo.per_device_batch_size": 4, **kw})


def test_a_resume_on_fewer_then_more_workers_keeps_the_checkpoints_global_batch():
    two = _cfg()
    saved = resume_fingerprint(two)  # written by 2 workers x 4 x accumulation 1
    assert global_batch(saved, "dpo") == 8
    one = _cfg(**{"scaling.num_workers": 1})  # the user only changed the workers
    assert fingerprint_diff(saved, resume_fingerprint(one)) == []  # not refused any more
    cfg, fp, line = keep_global_batch(one, "dpo", saved, resume_fingerprint(one))
    assert cfg.dpo.gradient_accumulation_steps == 2 and fp["dpo.global_batch"] == 8
    assert line == ("[dpo] resuming on 1 worker a checkpoint of 2 workers: the global batch stays 8 = per_device 4 "
                    "x 1 worker x gradient_accumulation_steps 2 (the config says 1)")
    # that run's checkpoints carry its fingerprint: on 1 worker again it accumulates 2 again ...
    assert keep_global_batch(one, "dpo", fp, resume_fingerprint(one))[0].dpo.gradient_accumulation_steps == 2
    # ... and back on 2 workers with the user's config nothing changes
    assert fingerprint_diff(fp, resume_fingerprint(two)) == []
    assert keep_global_batch(two, "dpo", fp, resume_fingerprint(two)) == (two, resume_fingerprint(two), None)
    # the user may split the same batch anew themselves
    mine = _cfg(**{"scaling.num_workers": 1, "dpo.gradient_accumulation_steps": 2})
    assert fingerprint_diff(saved, resume_fingerprint(mine)) == []
    assert keep_global_batch(mine, "dpo", saved, resume_fingerprint(mine))[2] is None


def test_only_a_change_of_the_maths_is_refused():
    saved = resume_fingerprint(_cfg())
    # another global batch, asked for through the accumulation or the per-device batch
    assert fingerprint_diff(saved, resume_fingerprint(_cfg(**{"dpo.gradient_accumulation_steps": 2}))) == [
        "dpo.global_batch"]
    assert fingerprint_diff(saved, resume_fingerprint(_cfg(**{"dpo.per_device_batch_size": 2, "scaling.num_workers": 4})
                                                      )) == ["dpo.per_device_batch_size"]
    assert fingerprint_diff(saved, resume_fingerprint(_cfg(**{"scaling.num_workers": 4, "dpo.beta": 0.2}))) == [
        "dpo.beta"]
    # a checkpoint written before the global batch was fingerprinted resumes on 1 worker too
    old = {k: v for k, v in saved.items() if not k.endswith(".global_batch")}
    one = _cfg(**{"scaling.num_workers": 1})
    assert fingerprint_diff(old, resume_fingerprint(one)) == []
    assert keep_global_batch(one, "dpo", old, resume_fingerprint(one))[0].dpo.gradient_accumulation_steps == 2


def test_zero3_checkpoints_resume_on_another_number_of_workers_too():
    z3 = {"deepspeed.stage": 3}
    saved = resume_fingerprint(_cfg(**z3))
    one = _cfg(**z3, **{"scaling.num_workers": 1})
    assert fingerprint_diff(saved, resume_fingerprint(one)) == []
    assert keep_global_batch(one, "dpo", saved, resume_fingerprint(one))[0].dpo.gradient_accumulation_steps == 2


def test_the_driver_resumes_on_other_workers_with_the_accumulation_that_keeps_the_batch_and_says_so():
    from raydpo.orchestration.errors import ResumeConfigError
    from raydpo.orchestration.launch import resume_shape

    saved, said = resume_fingerprint(_cfg(**{"dpo.max_steps": 10})), []
    one = _cfg(**{"dpo.max_steps": 10, "scaling.num_workers": 1})
    cfg, fp = resume_shape(one, "dpo", {"step": 4, "config": saved}, resume_fingerprint(one), said.append)
    assert cfg.dpo.gradient_accumulation_steps == 2 and fp["dpo.global_batch"] == 8 and len(said) == 1
    assert "global batch stays 8" in said[0]
    # a finished stage is reused as it is: nothing to split, nothing refused
    done = resume_shape(one, "dpo", {"step": 10, "config": saved}, resume_fingerprint(one), said.append)
    assert done == (one, resume_fingerprint(one)) and len(said) == 1
    three = _cfg(**{"dpo.max_steps": 10, "scaling.num_workers": 3})
    with pytest.raises(ResumeConfigError, match="resume on 1 or 2 workers"):
        resume_shape(three, "dpo", {"step": 4, "config": saved}, resume_fingerprint(three), said.append)


# -- the data position: the same pair ----------------------------------------------------------


def _pairs_of_step(n_rows: int, per_device: int, world: int, accum: int, step: int) -> list[int]:
    """The pair indices every rank trains on at optimizer step ``step`` (1-based) when resumed at
    step ``step - 1``: the loop skips ``(step - 1) x accum`` micro-batches (`raydpo.train.loop`)."""
    def stream(size):
        for lo in range(0, n_rows - size + 1, size):
            yield {"row_id": np.arange(lo, lo + size)}

    rows = []
    for rank in range(world):
        it = rank_batches(stream, per_device, world, rank, lambda b: b["row_id"].tolist(), skip=(step - 1) * accum)
        rows += [r for _, b in zip(range(accum), it) for r in b]
    return sorted(rows)


@pytest.mark.parametrize("per_device, world, accum", [(4, 2, 1), (4, 1, 2), (2, 4, 1), (2, 1, 4), (2, 2, 2)])
def test_a_resumed_stream_starts_at_pair_step_times_global_batch_on_any_number_of_workers(per_device, world, accum):
    # global batch 8 split five ways: the step after a checkpoint at step 3 trains pairs 24..31
    assert _pairs_of_step(64, per_device, world, accum, step=4) == list(range(24, 32))


# -- the engine: 2 workers -> 1 -> 2 against 2 that never stopped ------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(src: str, dest: Path) -> None:
    """What Ray Train does with the ranks' checkpoint folders: one folder holding every file."""
    for p in Path(src).rglob("*"):
        if p.is_file():
            (dest / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest / p.relative_to(src))
    shutil.rmtree(src, ignore_errors=True)


def _worker(rank: int, world: int, port: int, job: dict) -> None:
    """One rank of one run: the real loop (`run_stage`) on the tiny model, the pairs of
    ``job["data"]`` in the stream order, DeepSpeed (ZeRO-2 unless the config says 3) on a gloo
    group of ``world`` ranks."""
    import torch
    import torch.distributed as dist

    from raydpo.data.collate import collate_dpo
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.models.factory import load_model
    from raydpo.train.checkpoint import gathered_adapter
    from raydpo.train.engine import WorkerEnv
    from raydpo.train.loop import Hooks, run_stage
    from raydpo.train.standalone import train_stream

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = Config.from_dict(job["config"])
    d, tmp = cfg.dpo, Path(job["tmp"])
    cols = {k: np.array(v + [None], dtype=object)[:-1] for k, v in json.loads(Path(job["data"]).read_text()).items()}
    tok = load_tokenizer(job["model"])
    torch.manual_seed(0)  # the fresh adapter's init, the same on every rank and run
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=job["model"])
    env = WorkerEnv(rank, world, torch.device("cpu"), False)

    def collate(b):
        return collate_dpo(b, tok.pad_token_id, share_prefix=d.share_prefix, pack=d.padding_free)

    logged, calls = {}, [0]

    def report(metrics, ckpt):
        if ckpt:
            _merge(ckpt, tmp / f"checkpoint_step{int(metrics['step'])}")

    def stop():
        calls[0] += 1
        return job["stop_after"] is not None and calls[0] >= job["stop_after"]

    hooks = Hooks(train_batches=train_stream(cols, collate, cfg, "dpo", env),  # the run's stream, this rank's slice
                  eval_batches=lambda: iter([collate({k: v[:4] for k, v in cols.items()})]),
                  report=report, log=lambda m, s: logged.update({s: m}), resume_dir=job["resume_dir"],
                  progress=lambda s: None, stop_requested=stop, config_fingerprint=job["fingerprint"])
    result = run_stage("dpo", cfg, model, tok, env, hooks)
    with gathered_adapter(model):  # under ZeRO-3 each rank holds a slice of every LoRA weight
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, tmp / "lora.pt")
            (tmp / "log.json").write_text(json.dumps({"step": result.step, "logged": logged}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_cache):
    """24 tokenized pairs of the sample (one epoch of 6 steps x 4 pairs), the tiny model's path."""
    from raydpo.data.rows import format_prompt
    from raydpo.data.sample import generate_rows
    from raydpo.data.tokenize import tokenize_dpo
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.models.factory import resolve_model_path

    cfg = Config().with_overrides({"model.cache_dir": tiny_cache})
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    rows = generate_rows(24, seed=5)
    cols = tokenize_dpo(tok, [format_prompt(r["question"][:200], cfg.data.prompt_template) for r in rows],
                        [r["response_j"][:200] for r in rows], [r["response_k"][:200] for r in rows], 128, 64)
    data = tmp_path_factory.mktemp("pairs") / "pairs.json"
    data.write_text(json.dumps({k: [x.tolist() if hasattr(x, "tolist") else x for x in v] for k, v in cols.items()}))
    return cfg, str(path), str(data)


def _fit(pairs, tmp: Path, workers: int, *, resume_from: Path | None = None, stop_after: int | None = None,
         dropout: float = 0.0, overrides: dict | None = None) -> tuple[dict, dict]:
    """One run on ``workers`` gloo processes, configured as the driver would (`keep_global_batch`
    when resuming another number of workers' checkpoint); (its adapter, its log)."""
    import torch
    import torch.multiprocessing as mp

    from raydpo.train.checkpoint import verify_checkpoint

    base, path, data = pairs
    user = base.with_overrides({
        "dpo.max_steps": STEPS, "dpo.per_device_batch_size": PER_DEVICE, "dpo.gradient_accumulation_steps": 1,
        "dpo.log_every": 1, "dpo.eval_every": STEPS, "dpo.save_every": 2, "dpo.lr": 5e-3, "lora.dropout": dropout,
        "dpo.reference": "adapter_disabled", "deepspeed.stage": 2, "scaling.num_workers": workers, **(overrides or {})})
    cfg, fp = user, resume_fingerprint(user)
    if resume_from is not None:
        cfg, fp, _ = keep_global_batch(user, "dpo", verify_checkpoint(resume_from)["config"], fp)
    tmp.mkdir(parents=True)
    job = {"config": cfg.to_dict(), "model": path, "data": data, "tmp": str(tmp), "fingerprint": fp,
           "resume_dir": str(resume_from) if resume_from else None, "stop_after": stop_after}
    mp.start_processes(_worker, args=(workers, _free_port(), job), nprocs=workers, start_method="spawn")
    return torch.load(tmp / "lora.pt"), json.loads((tmp / "log.json").read_text())


@pytest.mark.timeout(600)
def test_two_workers_then_one_then_two_end_with_the_adapter_of_two_that_never_stopped(pairs, tmp_path):
    from raydpo.train.checkpoint import FULL_STATE, verify_checkpoint

    full, full_log = _fit(pairs, tmp_path / "full", 2)
    _, cut_log = _fit(pairs, tmp_path / "cut", 2, stop_after=2)  # preempted at step 2 on 2 workers
    two = tmp_path / "cut" / "checkpoint_step2"
    state = verify_checkpoint(two)
    assert cut_log["step"] == 2 and state["world_size"] == 2 and (two / "deepspeed" / "state" / FULL_STATE).exists()

    _, one_log = _fit(pairs, tmp_path / "one", 1, resume_from=two, stop_after=2)  # steps 3-4 on 1 worker
    one = tmp_path / "one" / "checkpoint_step4"
    assert one_log["step"] == 4 and verify_checkpoint(one)["world_size"] == 1
    assert verify_checkpoint(one)["micro_batches"] == 8  # 4 steps x accumulation 2: the same 16 pairs

    back, back_log = _fit(pairs, tmp_path / "back", 2, resume_from=one)  # steps 5-6 on 2 workers again
    _assert_like_the_uninterrupted_run(full, full_log, one_log, back, back_log)


def _assert_like_the_uninterrupted_run(full: dict, full_log: dict, one_log: dict, back: dict, back_log: dict) -> None:
    """Steps 3-4 (on 1 worker) and 5-6 (on 2 again) log what the run that never stopped logged,
    and end with its adapter: the same pairs per step and the same maths, only the order of the
    additions differs."""
    assert back_log["step"] == STEPS and sorted(map(int, back_log["logged"])) == [5, 6]
    assert any(v.abs().sum() > 0 for k, v in full.items() if "lora_B" in k)  # trained off LoRA's zero init
    worst = max(float((back[k] - full[k]).abs().max()) for k in full)
    assert worst < 1e-5, worst
    for log, steps in ((one_log, (3, 4)), (back_log, (5, 6))):
        for s in steps:
            for key in ("train/loss", "train/rewards/margins", "train/lr"):
                assert log["logged"][str(s)][key] == pytest.approx(full_log["logged"][str(s)][key], rel=1e-5,
                                                                   abs=1e-6), (s, key)
    assert back_log["logged"][str(STEPS)]["eval/loss"] == pytest.approx(
        full_log["logged"][str(STEPS)]["eval/loss"], rel=1e-5, abs=1e-6)


@pytest.mark.timeout(600)
def test_under_zero3_two_workers_then_one_then_two_end_with_the_adapter_of_two_that_never_stopped(pairs, tmp_path):
    """ZeRO-3 partitions every weight too (persistence threshold 0): DeepSpeed loads none of its
    shards on another world size, so the resume re-partitions rank 0's whole copy itself."""
    from raydpo.train.checkpoint import FULL_STATE, verify_checkpoint

    z3 = {"deepspeed.stage": 3, "deepspeed.stage3_param_persistence_threshold": 0}
    full, full_log = _fit(pairs, tmp_path / "full", 2, overrides=z3)
    two = tmp_path / "full" / "checkpoint_step2"  # saved on the way (save_every 2): what a stop at 2 leaves
    assert verify_checkpoint(two)["world_size"] == 2 and (two / "deepspeed" / "state" / FULL_STATE).exists()
    _, one_log = _fit(pairs, tmp_path / "one", 1, resume_from=two, stop_after=2, overrides=z3)  # steps 3-4
    one = tmp_path / "one" / "checkpoint_step4"
    assert one_log["step"] == 4 and verify_checkpoint(one)["micro_batches"] == 8
    back, back_log = _fit(pairs, tmp_path / "back", 2, resume_from=one, overrides=z3)  # steps 5-6 on 2 again
    _assert_like_the_uninterrupted_run(full, full_log, one_log, back, back_log)


def test_the_plain_engine_resumes_a_rank_the_checkpoint_lacks_at_its_accumulation_boundaries(tmp_path):
    """Without DeepSpeed every rank's state is whole: a rank the checkpoint's world lacked loads
    rank 0's, and a step count saved under accumulation 1 is counted in the new accumulation (the
    first micro-batch after 3 steps is not a boundary under accumulation 2)."""
    import torch

    from raydpo.train.plain import PlainEngine

    def engine(rank: int, accum: int) -> PlainEngine:
        torch.manual_seed(rank)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return PlainEngine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), accum=accum,
                           max_grad_norm=1.0, rank=rank, world_size=1, device=torch.device("cpu"))

    x = torch.ones(1, 2)
    one = engine(rank=0, accum=1)
    for _ in range(3):
        one.backward(one(x).sum())
        one.step()
    one.save_checkpoint(str(tmp_path), "state", client_state={"step": 3})
    two = engine(rank=1, accum=2)  # rank 1 of a resume on 2 workers, accumulating 2 micro-batches
    where, client = two.load_checkpoint(str(tmp_path), "state")
    assert client == {"step": 3} and where.endswith("plain_r0.pt")
    assert torch.equal(two.module.weight, one.module.weight) and two.global_steps == 3 and two.micro_steps == 6
    assert not two.is_boundary()
    two.backward(two(x).sum())
    two.step()
    assert two.is_boundary() and two.global_steps == 3
