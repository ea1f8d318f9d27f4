"""Run storage on a local folder and on an object store (`raydpo.storage` and its callers), Ray-free.

The object store is moto's S3 server in this process (what Ray's own storage tests use), reached
the way a user reaches theirs: ``AWS_ENDPOINT_URL`` and the standard ``AWS_*`` credentials in the
environment, through pyarrow. Each test works under its own prefix of one bucket.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from raydpo import storage, storage_copy
from raydpo.config import load_config

BUCKET = "raydpo-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """``s3://raydpo-test``: a bucket on an in-process S3 server, with the environment pointing at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    storage._remote_fs.cache_clear()  # a filesystem per bucket is cached: none from before this server
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                         "AWS_EC2_METADATA_DISABLED": "true"}.items():
                mp.setenv(k, v)
            mp.delenv("AWS_SESSION_TOKEN", raising=False)
            mp.delenv("AWS_PROFILE", raising=False)
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        storage._remote_fs.cache_clear()
        server.stop()


def _prefix(s3: str, what: str) -> str:
    """A fresh folder in the bucket for one test."""
    return storage.join(s3, f"{what}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def node_tmp(tmp_path, monkeypatch):
    """This node's temp dir (where `local_copy` keeps its downloads): the test's own."""
    import tempfile

    d = tmp_path / "node-tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _local_files(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _remote_files(loc: str) -> dict[str, bytes]:
    return {rel: storage.read_bytes(storage.join(loc, rel)) for rel in storage.walk_files(loc)}


# -- 1. locations --------------------------------------------------------------------------------


def test_locations_local_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    here = tmp_path.resolve()
    assert storage.root("runs") == str(here / "runs")  # relative: against the cwd, absolute from then on
    assert storage.root("~/runs") == str(here / "home" / "runs")
    assert storage.root(f"file://{here}/runs/") == str(here / "runs")
    assert storage.root("s3://bucket/runs/") == "s3://bucket/runs"  # a URI is kept, trailing slash dropped
    assert not storage.is_remote("runs") and not storage.is_remote(f"file://{here}") and not storage.is_remote(here)
    assert storage.is_remote("s3://bucket/runs") and storage.is_remote("gs://b/x") and storage.is_remote("abfs://c/x")
    assert not (tmp_path / "s3:").exists()  # the bug: a folder named `s3:` in the cwd

    assert storage.join("s3://bucket/runs", "a", "b.txt") == "s3://bucket/runs/a/b.txt"
    assert storage.parent("s3://bucket/runs/a/") == "s3://bucket/runs"
    assert storage.name("s3://bucket/runs/a/") == "a"
    assert storage.join(str(here), "a", "b") == str(here / "a" / "b")
    assert storage.parent(str(here / "a")) == str(here) and storage.name(str(here / "a")) == "a"

    remote = storage.stage_dir("s3://bucket/runs/", "demo", "dpo")
    assert remote == "s3://bucket/runs/demo-dpo"
    assert storage.run_record(remote) == "s3://bucket/runs/demo-dpo/raydpo_run.json"
    assert storage.log_file("s3://bucket/runs", "demo") == "s3://bucket/runs/demo/raydpo.log"
    local = storage.stage_dir("runs", "demo", "dpo")
    assert local == str(here / "runs" / "demo-dpo")
    assert storage.run_record(local) == str(here / "runs" / "demo-dpo" / "raydpo_run.json")
    for d in ("checkpoint_000002", "checkpoint_000001", "faults_fired"):
        (here / "runs" / "demo-dpo" / d).mkdir(parents=True)
    assert storage.checkpoints(local) == [str(here / "runs" / "demo-dpo" / f"checkpoint_00000{i}") for i in (1, 2)]


def test_checkpoints_of_a_stage_folder_in_the_bucket_are_uris(s3):
    stage = storage.stage_dir(_prefix(s3, "runs"), "demo", "sft")
    for step in (2, 1):
        storage.write_text(storage.state_file(storage.join(stage, f"checkpoint_00000{step}")), "{}")
    storage.write_text(storage.run_record(stage), "{}")
    assert storage.checkpoints(stage) == [f"{stage}/checkpoint_000001", f"{stage}/checkpoint_000002"]


# -- 2. the I/O contract, on a local folder and in the bucket ------------------------------------


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return _prefix(request.getfixturevalue("s3"), "io")


def test_io_contract(where, tmp_path):
    f = storage.join(where, "a", "b.txt")
    assert not storage.exists(f) and storage.read_json(f) is None
    storage.write_text(f, "hello")  # parents made
    assert storage.read_text(f) == "hello" and storage.read_bytes(f) == b"hello"
    assert storage.exists(f) and storage.is_file(f) and not storage.is_dir(f)
    assert storage.is_dir(storage.join(where, "a")) and not storage.is_file(storage.join(where, "a"))
    with pytest.raises(OSError):
        storage.read_text(storage.join(where, "missing.txt"))

    storage.write_text(storage.join(where, "good.json"), json.dumps({"step": 3}))
    storage.write_text(storage.join(where, "bad.json"), "{not json")
    assert storage.read_json(storage.join(where, "good.json")) == {"step": 3}
    assert storage.read_json(storage.join(where, "bad.json")) is None

    log = storage.join(where, "logs", "x.log")
    storage.append_text(log, "one\n")
    storage.append_text(log, "two\n")
    assert storage.read_text(log) == "one\ntwo\n"

    stage = storage.join(where, "demo-dpo")
    for d, data in (("checkpoint_000001", b"1"), ("checkpoint_000002", b"22"), ("faults_fired", b"333")):
        storage.write_bytes(storage.join(stage, d, "f.bin"), data)
    assert storage.list_dirs(stage, "checkpoint_*") == ["checkpoint_000001", "checkpoint_000002"]
    assert storage.list_dirs(stage) == ["checkpoint_000001", "checkpoint_000002", "faults_fired"]
    assert storage.list_dirs(storage.join(where, "nowhere")) == []
    sizes = {k: size for k, (size, _) in storage.walk_files(stage).items()}
    assert sizes == {"checkpoint_000001/f.bin": 1, "checkpoint_000002/f.bin": 2, "faults_fired/f.bin": 3}
    assert storage.walk_files(storage.join(where, "nowhere")) == {}
    if not storage.is_remote(where):  # atomic local writes leave no temporary beside the file
        assert not [p for p in Path(where).rglob("*") if p.name.endswith(".tmp")]

    moved = storage.join(where, "demo-dpo.before-restart-1")
    storage.move(stage, moved)
    assert not storage.exists(stage)
    assert {k: s for k, (s, _) in storage.walk_files(moved).items()} == sizes
    storage.move(log, storage.join(where, "logs", "x.log.replayed"))  # a file (the spill's replay)
    assert not storage.exists(log) and storage.read_text(storage.join(where, "logs", "x.log.replayed")) == "one\ntwo\n"

    storage.remove(f)
    storage.remove(moved)
    storage.remove(storage.join(where, "never-there"))  # nothing to remove: fine
    storage.remove(storage.join(where, "never-there", "x.txt"))
    assert not storage.exists(f) and not storage.exists(moved)

    src = _make_folder(tmp_path / "src", {"config.json": b"{}", "w/model.bin": os.urandom(3000), "w/empty": b""})
    there = storage.join(where, "copied")
    storage.copy_tree(str(src), there)
    back = tmp_path / "back"
    storage.copy_tree(there, str(back))
    assert _local_files(back) == _local_files(src)


# -- 3. local_copy ---------------------------------------------------------------------------


def _next_second() -> None:
    """Object stores keep a modification time in whole seconds: a rewrite after this one differs."""
    time.sleep(1.02 - time.time() % 1)


def test_local_copy_of_a_bucket_folder_is_reused_until_the_folder_changes(s3, tmp_path, node_tmp):
    model = storage.join(_prefix(s3, "models"), "tiny")
    src = _make_folder(tmp_path / "v1", {"config.json": b'{"v": 1}', "model.bin": b"A" * 1000, "tok/vocab.txt": b"a b"})
    storage.copy_tree(str(src), model)

    first = storage_copy.local_copy(model)
    assert Path(first).is_relative_to(node_tmp)
    got = {k: v for k, v in _local_files(first).items() if k != storage.COPY_DONE}
    assert got == _local_files(src)
    Path(first, "model.bin").write_bytes(b"X" * 1000)  # a second call must not download again
    assert storage_copy.local_copy(model) == first
    assert Path(first, "model.bin").read_bytes() == b"X" * 1000

    _next_second()  # a new SFT merge at the same place: same names, same sizes, other bytes
    storage.write_bytes(storage.join(model, "model.bin"), b"B" * 1000)
    fresh = storage_copy.local_copy(model)
    assert fresh != first
    assert Path(fresh, "model.bin").read_bytes() == b"B" * 1000
    assert Path(fresh, "config.json").read_bytes() == b'{"v": 1}'
    assert not Path(first).exists(), "the copy of the earlier content is dropped: one copy per location on a node"

    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage_copy.local_copy(storage.join(s3, "no-such-model"))
    assert storage_copy.local_copy(str(src)) == str(src)  # a local folder is its own copy


def test_local_copy_of_a_bucket_file_is_refreshed_when_it_changes(s3, node_tmp):
    f = storage.join(_prefix(s3, "data"), "pairs.jsonl")
    storage.write_text(f, '{"v": 1}\n')
    first = storage_copy.local_copy(f)
    assert Path(first).read_text() == '{"v": 1}\n' and Path(first).name == "pairs.jsonl"
    _next_second()
    storage.write_text(f, '{"v": 22}\n')
    assert Path(storage_copy.local_copy(f)).read_text() == '{"v": 22}\n'


# -- 4. publish ------------------------------------------------------------------------------


def test_publish_copies_once_and_redoes_a_half_published_folder(s3, tmp_path):
    src = _make_folder(tmp_path / "tiny", {"config.json": b'{"v": 1}', "model.bin": b"M" * 500})
    loc = storage.model_dir(_prefix(s3, "runs"), "tiny-abc")
    assert storage_copy.publish(src, loc) == loc
    done = storage.join(loc, storage.COPY_DONE)
    assert storage.exists(done)
    assert {k: v for k, v in _remote_files(loc).items() if k != storage.COPY_DONE} == _local_files(src)

    (src / "model.bin").write_bytes(b"N" * 500)  # a second driver's build: the published one stays
    assert storage_copy.publish(src, loc) == loc
    assert storage.read_bytes(storage.join(loc, "model.bin")) == b"M" * 500

    half = storage.model_dir(_prefix(s3, "runs"), "tiny-abc")  # a driver died mid-copy: files, no marker
    storage.write_bytes(storage.join(half, "model.bin"), b"M" * 10)
    storage.write_bytes(storage.join(half, "stale.bin"), b"old")
    storage_copy.publish(src, half)
    assert {k: v for k, v in _remote_files(half).items() if k != storage.COPY_DONE} == _local_files(src)
    assert storage.exists(storage.join(half, storage.COPY_DONE))


def test_publish_into_a_local_storage_folder(tmp_path):
    src = _make_folder(tmp_path / "tiny", {"config.json": b"{}", "w/model.bin": b"M" * 50})
    loc = storage.model_dir(str(tmp_path / "runs"), "tiny-abc")
    assert storage_copy.publish(src, loc) == loc
    assert {k: v for k, v in _local_files(loc).items() if k != storage.COPY_DONE} == _local_files(src)
    (src / "w" / "model.bin").write_bytes(b"N" * 50)
    storage_copy.publish(src, loc)
    assert Path(loc, "w", "model.bin").read_bytes() == b"M" * 50
    assert [p.name for p in Path(loc).parent.iterdir()] == ["tiny-abc"]  # no publishing folder left beside it
    Path(loc, storage.COPY_DONE).unlink()  # a folder there that is not a finished publish (copied by hand)
    storage_copy.publish(src, loc)
    assert Path(loc, "w", "model.bin").read_bytes() == b"N" * 50 and Path(loc, storage.COPY_DONE).exists()


# -- 5. verify_checkpoint on a checkpoint in the bucket --------------------------------------------


def _checkpoint(folder: Path, step: int) -> Path:
    """One rank-0 checkpoint laid out as `raydpo.train.checkpoint.save_state` writes it."""
    from raydpo.train.checkpoint import _write_manifest

    _make_folder(folder, {
        "adapter/adapter_config.json": b'{"r": 8}', "adapter/adapter_model.safetensors": os.urandom(2048),
        "deepspeed/state/mp_rank_00_model_states.pt": os.urandom(4096), "rng_r0.pt": os.urandom(256)})
    storage.write_text(storage.state_file(folder), json.dumps({"step": step, "stage": "dpo", "world_size": 1}))
    _write_manifest(folder, 0)
    return folder


def test_verify_checkpoint_in_the_bucket(s3, tmp_path):
    from raydpo.train.checkpoint import CheckpointError, verify_checkpoint
    from raydpo.train.worker import intact_checkpoints

    stage = storage.stage_dir(_prefix(s3, "runs"), "demo", "dpo")
    for step in (2, 4, 6):
        storage.copy_tree(str(_checkpoint(tmp_path / f"c{step}", step)), storage.join(stage, f"checkpoint_00000{step}"))
    c2, c4, c6 = storage.checkpoints(stage)
    assert verify_checkpoint(c4) == {"step": 4, "stage": "dpo", "world_size": 1}

    weights = storage.join(c4, "deepspeed", "state", "mp_rank_00_model_states.pt")
    storage.write_bytes(weights, os.urandom(4096))  # same size, other bytes: only the digest sees it
    with pytest.raises(CheckpointError, match="deepspeed/state/mp_rank_00_model_states.pt is missing or damaged"):
        verify_checkpoint(c4)
    storage.remove(storage.manifest_file(c6, 0))  # a rank that died before its manifest
    with pytest.raises(CheckpointError, match="manifest is missing"):
        verify_checkpoint(c6)
    storage.remove(storage.join(c2, "rng_r0.pt"))
    with pytest.raises(CheckpointError, match="rng_r0.pt is missing"):
        verify_checkpoint(c2)
    storage.copy_tree(str(tmp_path / "c2"), c2)
    assert intact_checkpoints(stage) == [c2]  # what a resume picks: the newest intact one


# -- 6. the reference cache in the bucket ----------------------------------------------------------


def _write_parquet(loc: str, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(loc)
    pq.write_table(pa.table({"row_id": list(range(rows)), "ref_chosen_logps": [-1.0] * rows}), path, filesystem=fs)


def test_reference_cache_in_the_bucket_is_complete_or_rebuilt(s3):
    from raydpo.orchestration.reference import SPLIT_COLUMN, commit_cache, parquet_rows, valid_cache

    split = storage.join(_prefix(s3, "split"), "train")
    _write_parquet(storage.join(split, "a.parquet"), 3)
    _write_parquet(storage.join(split, "b.parquet"), 4)
    assert parquet_rows(split) == 7

    root = storage.reference_dir(_prefix(s3, "runs"), "k" * 16)
    tmp = storage.reference_building(root, 1234)  # as Ray Data's partitioned write leaves it
    _write_parquet(storage.join(storage.partition_dir(tmp, SPLIT_COLUMN, "train"), "0_000000.parquet"), 5)
    _write_parquet(storage.join(storage.partition_dir(tmp, SPLIT_COLUMN, "train"), "1_000000.parquet"), 6)
    _write_parquet(storage.join(storage.partition_dir(tmp, SPLIT_COLUMN, "eval"), "0_000000.parquet"), 2)
    assert valid_cache(root) is None
    commit_cache(tmp, root, {"key": "k" * 16})
    marker = valid_cache(root)
    assert marker == {"rows": {"train": 11, "eval": 2}, "key": "k" * 16}
    assert not storage.exists(tmp)
    assert sorted(storage.walk_files(root)) == ["_SUCCESS", "eval/0_000000.parquet", "train/0_000000.parquet",
                                                "train/1_000000.parquet"]

    storage.remove(storage.join(storage.reference_split(root, "train"), "1_000000.parquet"))
    assert valid_cache(root) is None  # a lost object: rebuilt, never trusted


# -- 7. raydpo validate: can the URI take writes ------------------------------------------------


def test_check_remote_storage(s3):
    from raydpo.orchestration.checks import check_remote_storage, check_storage

    top = _prefix(s3, "runs")
    assert check_remote_storage(top) is None
    assert storage.walk_files(top) == {}  # the probe object is gone
    assert check_storage(load_config(None, [f"run.storage_path={top}"])) is None

    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/runs"
    line = check_remote_storage(missing)
    assert line is not None and "\n" not in line
    assert line.startswith(f"run.storage_path {missing} is not writable (")
    assert "AWS_ENDPOINT_URL" in line and "credentials" in line
    assert check_storage(load_config(None, [f"run.storage_path={missing}"])).startswith(f"run.storage_path {missing} ")
    assert not storage.exists(missing)


# -- 8. a relative storage path under a Ray job --------------------------------------------------


def test_relative_storage_is_refused_under_a_ray_job(s3, monkeypatch, tmp_path):
    from raydpo.orchestration.errors import StorageError
    from raydpo.orchestration.nodes import RAY_JOB_ENV, check_job_storage
    from raydpo.orchestration.submit import job_storage_problem

    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    relative = load_config(None, ["run.storage_path=my_runs"])
    check_job_storage(relative)  # outside a job: the cwd stays, a relative path is fine

    monkeypatch.setenv(RAY_JOB_ENV, '{"runtime_env": {}}')
    with pytest.raises(StorageError, match="run.storage_path 'my_runs' is relative") as e:
        check_job_storage(relative)
    assert "\n" not in str(e.value) and "s3://" in str(e.value)
    for ok in (str(tmp_path / "runs"), "~/runs", f"{s3}/runs"):
        check_job_storage(load_config(None, [f"run.storage_path={ok}"]))
        assert job_storage_problem(ok) is None
    assert "'raydpo_runs'" in job_storage_problem(load_config(None, []).run.storage_path)  # the default is refused


# -- 9. the resume fingerprint -------------------------------------------------------------------


def test_locations_are_not_part_of_the_resume_fingerprint():
    from raydpo.config import fingerprint_diff, resume_fingerprint

    a = load_config(None, ["run.storage_path=/mnt/a/runs", "model.cache_dir=/tmp/a"])
    b = load_config(None, ["run.storage_path=s3://bucket/runs", "model.cache_dir=/tmp/b"])
    assert resume_fingerprint(a) == resume_fingerprint(b)
    old = {**resume_fingerprint(a), "run.storage_path": "/home/me/job_123/raydpo_runs",
           "model.cache_dir": "/home/me/job_123/.raydpo_cache"}  # an older checkpoint's fingerprint has them
    assert fingerprint_diff(old, resume_fingerprint(b)) == []
    assert fingerprint_diff({**old, "dpo.beta": 0.5}, resume_fingerprint(b)) == ["dpo.beta"]  # the maths still counts


def test_a_resubmitted_job_resumes_from_another_cwd(s3, tmp_path, monkeypatch):
    """`fit_stage` from two package folders (`ray job submit --working-dir` twice): the second
    finds the first's run record and is not refused as another config."""
    from raydpo.config import resume_fingerprint
    from raydpo.orchestration import launch
    from raydpo.orchestration.errors import ResumeConfigError
    from raydpo.orchestration.nodes import RAY_JOB_ENV

    class Reached(Exception):
        pass

    seen = []

    def stop_after_prepare(run):
        seen.append(run)
        raise Reached

    monkeypatch.setattr(launch, "reuse_finished_stage", stop_after_prepare)
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    top = _prefix(s3, "runs")
    overrides = ["data.source=data/pairs.jsonl", f"run.storage_path={top}", "run.name=resub",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    jobs = []
    for job in ("job_1", "job_2"):
        _make_folder(tmp_path / job, {"data/pairs.jsonl": b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'})
        monkeypatch.chdir(tmp_path / job)
        cfg = load_config(None, overrides)
        jobs.append(cfg)
        with pytest.raises(Reached):
            launch.fit_stage(cfg, "dpo", progress=lambda line: None)
        if job == "job_1":  # what `_claim_folder` records for the next driver
            storage.write_text(storage.run_record(seen[0].folder), json.dumps({"fingerprint": seen[0].fingerprint}))
    first, second = seen
    assert first.cfg.data.source == str(tmp_path / "job_1" / "data" / "pairs.jsonl")  # workers get absolute paths
    assert second.cfg.data.source == str(tmp_path / "job_2" / "data" / "pairs.jsonl")
    assert first.fingerprint == second.fingerprint and second.record["fingerprint"] == first.fingerprint
    # the same comparison on the absolute configs would have refused the resubmission
    assert resume_fingerprint(first.cfg) != resume_fingerprint(second.cfg)

    monkeypatch.chdir(tmp_path / "job_1")
    with pytest.raises(ResumeConfigError, match="dpo.beta"):  # the record is read: a real change is refused
        launch.fit_stage(jobs[0].with_overrides({"dpo.beta": 0.3}), "dpo", progress=lambda line: None)


# -- 10. nodes that share no disk --------------------------------------------------------------------


def test_shared_paths_lists_only_what_a_worker_reads_from_local_disk(tmp_path):
    from raydpo.orchestration.nodes import shared_paths

    model = _make_folder(tmp_path / "my-model", {"config.json": b"{}"})
    local = load_config(None, [f"run.storage_path={tmp_path / 'runs'}", f"model.name_or_path={model}"])
    db = tmp_path / "store" / "mlflow.db"
    assert shared_paths(local, f"sqlite:///{db}") == {
        "run.storage_path": str(tmp_path / "runs"), "model.name_or_path": str(model),
        f"the MLflow store sqlite:///{db}": str(tmp_path / "store")}
    remote = load_config(None, ["run.storage_path=s3://bucket/runs"])
    assert shared_paths(remote, "http://mlflow.internal:5000") == {}


class _FakeCluster:
    """`ray.remote`/`ray.get` for `check_nodes_share`: the probe runs here, as it would on the
    node, with that node's view of the disk (``blind``: folders it has no copy of)."""

    def __init__(self, blind: list[Path]):
        self.blind = [str(p) for p in blind]
        self.pinned: list[str] = []
        self.probed: list[list[str]] = []

    def remote(self, **_):
        def wrap(fn):
            cluster = self

            class Probe:
                def options(self, scheduling_strategy):
                    assert not scheduling_strategy.soft  # on that node, not wherever there is room
                    cluster.pinned.append(scheduling_strategy.node_id)
                    return self

                def remote(self, expected):
                    cluster.probed.append([f for f, _ in expected if os.path.exists(f)])  # written before the probe
                    real = os.path.isfile
                    os.path.isfile = lambda p: real(p) and not any(str(p).startswith(b) for b in cluster.blind)
                    try:
                        return fn(expected)
                    finally:
                        os.path.isfile = real
            return Probe()
        return wrap

    @staticmethod
    def get(value, timeout=None):
        assert timeout is not None  # every wait on another node is bounded
        return value


NODE = {"NodeID": "f00dfeed" + "0" * 48, "NodeManagerAddress": "10.0.0.7", "Alive": True, "Resources": {"CPU": 4.0}}


@pytest.fixture
def cluster(monkeypatch):
    import ray

    from raydpo.orchestration import nodes

    def use(blind: list[Path], others: list[dict]) -> _FakeCluster:
        fake = _FakeCluster(blind)
        monkeypatch.setattr(nodes, "worker_nodes", lambda: others)
        monkeypatch.setattr(ray, "remote", fake.remote)
        monkeypatch.setattr(ray, "get", fake.get)
        return fake
    return use


def test_a_node_that_does_not_see_the_storage_folder_is_refused(tmp_path, cluster):
    from raydpo.orchestration.errors import StorageError
    from raydpo.orchestration.nodes import check_nodes_share

    runs, db = tmp_path / "runs", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = load_config(None, [f"run.storage_path={runs}"])
    fake = cluster([runs], [NODE])
    with pytest.raises(StorageError) as e:
        check_nodes_share(cfg, db)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"run.storage_path {runs} is a local folder that node 10.0.0.7 (f00dfeed)")
    assert "NFS" in line and "s3://" in line
    assert fake.pinned == [NODE["NodeID"]] and len(fake.probed[0]) == 2  # both markers there during the probe
    assert not list(runs.glob(".raydpo_node_check-*")) and not list((tmp_path / "store").glob(".raydpo_node_check-*"))

    cluster([], [NODE])  # a node that mounts the same folders (NFS): no complaint
    check_nodes_share(cfg, db)


def test_a_node_that_does_not_see_the_sqlite_store_is_refused(tmp_path, cluster):
    from raydpo.orchestration.errors import TrackingError
    from raydpo.orchestration.nodes import check_nodes_share

    db = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cluster([tmp_path / "store"], [NODE])
    with pytest.raises(TrackingError, match=r"the MLflow store sqlite:///.* node 10.0.0.7 \(f00dfeed\) does not see.*"
                                            r"tracking server \(http://"):
        check_nodes_share(load_config(None, ["run.storage_path=s3://bucket/runs"]), db)


def test_a_model_folder_is_checked_by_its_config_without_writing_into_it(tmp_path, cluster):
    """A shared model volume is often read-only: nothing is written there; its config.json is
    looked for, at its size, on the node."""
    from raydpo.orchestration.errors import StorageError
    from raydpo.orchestration.nodes import check_nodes_share

    model = _make_folder(tmp_path / "llama", {"config.json": b'{"model_type": "llama"}'})
    cfg = load_config(None, ["run.storage_path=s3://bucket/runs", f"model.name_or_path={model}"])
    cluster([], [NODE])
    check_nodes_share(cfg, "http://mlflow:5000")  # the node sees the same folder
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    cluster([model], [NODE])
    with pytest.raises(StorageError, match=rf"model.name_or_path {model} is a local folder that node 10.0.0.7"):
        check_nodes_share(cfg, "http://mlflow:5000")


def test_one_node_checks_nothing_and_writes_nothing(tmp_path, cluster):
    from raydpo.orchestration.nodes import check_nodes_share

    runs = tmp_path / "runs"
    fake = cluster([runs], [])
    check_nodes_share(load_config(None, [f"run.storage_path={runs}"]), f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    assert not runs.exists() and not (tmp_path / "store").exists() and fake.probed == []


# -- 11. the console's log in the bucket --------------------------------------------------------------


def test_console_log_goes_to_the_bucket_and_a_rerun_appends(s3):
    from raydpo.orchestration.console import Console
    from raydpo.tracking.terminal import echo

    top = _prefix(s3, "runs")
    target = storage.log_file(top, "demo")
    for line in ("[dpo] first run", "[dpo] second run"):
        out = io.StringIO()
        with Console(target, out=out, err=io.StringIO()) as con:
            echo(line)
            con.settle()  # training began
        assert out.getvalue() == f"{line}\n"
    assert [x for x in storage.read_text(target).splitlines() if x.startswith("[dpo]")] == [
        "[dpo] first run", "[dpo] second run"]

    refused = storage.log_file(top, "refused")  # a command refused before training leaves no log in storage
    with Console(refused, out=io.StringIO(), err=io.StringIO()):
        echo("error: something")
    assert not storage.exists(refused)


# -- 12. the tracking spill into the bucket ----------------------------------------------------------


def test_buffered_logger_spills_into_the_bucket(s3, monkeypatch, capsys):
    from raydpo import tracking

    for env in (tracking.HTTP_MAX_RETRIES_ENV, tracking.HTTP_TIMEOUT_ENV):  # the logger sets them process-wide
        monkeypatch.setenv(env, "1")
        monkeypatch.delenv(env)
    stage = storage.stage_dir(_prefix(s3, "runs"), "demo", "dpo")
    spill = storage.spill_file(stage, "dpo")
    for rounds in (1, 2):  # a second worker group (after a restart) appends
        logger = tracking.BufferedLogger(f"http://127.0.0.1:{_free_port()}", "0" * 32, retry_s=0.1, max_retry_s=0.2,
                                         spill_path=spill)
        for step in (1, 2):
            logger.log_metrics({"train/loss": 0.5 + step}, step=step)
        assert logger.close(timeout_s=0.5) == 2
    records = [json.loads(x) for x in storage.read_text(spill).splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in records] == [("train/loss", 1, 1.5), ("train/loss", 2, 2.5)] * 2
    assert f"raydpo tracking replay {spill}" in capsys.readouterr().err


# -- review fixes: partial copies, the stop file in a bucket, URI options, a base's recorded name --


def test_a_tokenizer_copy_fetches_no_weights_and_leaves_the_whole_copy_alone(s3, tmp_path, node_tmp):
    model = storage.join(_prefix(s3, "models"), "merged")
    src = _make_folder(tmp_path / "m", {"config.json": b"{}", "tokenizer.json": b"{}", "tokenizer_config.json": b"{}",
                                        "model.safetensors": b"W" * 4000, "sub/tokenizer.json": b"x"})
    storage.copy_tree(str(src), model)
    whole = storage_copy.local_copy(model)
    tok = storage_copy.local_copy(model, only=storage_copy.is_tokenizer_file)
    assert tok != whole and Path(whole, "model.safetensors").exists()  # a partial copy never replaces a whole one
    assert sorted(p.name for p in Path(tok).iterdir() if p.name != storage.COPY_DONE) == [
        "config.json", "tokenizer.json", "tokenizer_config.json"]


def test_a_stop_file_in_a_bucket_is_looked_up_at_most_every_ten_seconds(s3, monkeypatch):
    from raydpo.train import preempt

    stop = storage.stop_file(_prefix(s3, "stage"))
    calls = []
    real = storage.exists
    monkeypatch.setattr(storage, "exists", lambda loc: calls.append(loc) or real(loc))
    watch = preempt.StopWatch(stop)
    try:
        assert watch.requested() is False and watch.requested() is False
        assert len(calls) == 1  # the second step asked nothing
        storage.write_text(stop, "SIGTERM\n")
        watch._next = 0.0  # ten seconds later
        assert watch.requested() is True and watch.requested() is True and len(calls) == 2
    finally:
        watch.close()
    monkeypatch.setattr(storage, "exists", lambda loc: (_ for _ in ()).throw(OSError("store down")))
    down = preempt.StopWatch(stop)
    try:
        assert down.requested() is False  # a failed look-up is "not yet", not a crashed worker
    finally:
        down.close()


def test_options_in_a_storage_uri_are_refused_in_one_line():
    from raydpo.orchestration.checks import check_remote_storage

    line = check_remote_storage("s3://bucket/runs?endpoint_override=127.0.0.1:9000")
    assert line and "\n" not in line and "AWS_ENDPOINT_URL" in line


def test_a_model_loaded_from_the_bucket_records_its_storage_location_as_the_adapters_base(s3, tmp_path, node_tmp):
    """PEFT writes the base model's name into every adapter: the location in storage, never the
    node's temporary copy (`raydpo export --merge` and MLflow's lineage read it)."""
    from raydpo.config import Config
    from raydpo.models.factory import load_model
    from raydpo.models.tiny import ensure_tiny_model

    cfg = Config().with_overrides({"model.cache_dir": str(Path(__file__).resolve().parents[1] / ".raydpo_cache"),
                                   "quantization.mode": "none"})
    loc = storage_copy.publish(ensure_tiny_model(cfg.model), storage.model_dir(_prefix(s3, "runs"), "tiny"))
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=loc)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == loc
