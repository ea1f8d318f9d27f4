"""Run storage: every path under ``run.storage_path``, named and joined here and nowhere else.

The layout of a run's storage (``<root>`` = ``run.storage_path``)::

    <root>/
      <run>/                          the run's own folder
        raydpo.log                    the console's full log (`log_file`)
        sft-merged/                   base + SFT adapter, merged: DPO's base (`merged_sft_dir`)
          raydpo_merged.json          what was merged (`merged_marker`)
      <run>-<stage>/                  Ray Train's folder of one stage (`stage_dir`)
        raydpo_run.json               the MLflow run id, base, config fingerprint (`run_record`)
        raydpo_stop_requested         the driver's preemption flag (`stop_file`)
        raydpo_oom.json               a worker's out-of-memory message (`oom_marker`)
        mlflow_buffer_<stage>.jsonl   metrics the workers could not send (`spill_file`)
        mlflow_buffer_<stage>.jsonl.replayed   the same, once sent (`replayed_file`)
        faults_fired/                 which injected faults already fired (`faults_dir`)
        checkpoint_*/                 Ray Train's checkpoints (`checkpoints`)
          adapter/ deepspeed/ trainer_state.json rng_r<k>.pt manifest_r<k>.json
      <run>-<stage>-standalone/       the torchrun runner's output (`standalone_dir`)
        step_<n>/                     its checkpoint of step n (`standalone_step_dir`)
      reference/                      reference log-prob caches and content digests (`reference_dir`)
        digests.json                  file digests remembered by (path, size, mtime) (`digest_memo`)
        <key>/                        one cache, by content key (`reference_dir`)
          train/ eval/                parquet of each split (`reference_split`)
          _SUCCESS                    written last: the row count of every split (`reference_marker`)
        .<key>.building-<pid>/        a cache being built (`reference_building`)
      <tune name>/                    a Tune search's experiment folder (`tune_dir`)

``run.storage_path`` is a local folder (shared by every node: NFS, a mounted volume) or any URI
pyarrow opens, as Ray Train's own storage does (``s3://``, ``gs://``, ``abfs://``; credentials and
``AWS_ENDPOINT_URL`` from the standard environment). A location is therefore a ``str``: an
absolute local path or a URI. The path functions below only join names; the I/O functions at the
end (`exists`, `read_text`, `write_text`, `upload`, ...) read and write either kind
through ``pyarrow.fs``, so no caller opens a storage path itself.

Torch-free and Ray-free: the driver, the workers and the tools all ask it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
from functools import lru_cache
from pathlib import Path

RUN_RECORD = "raydpo_run.json"
SPILL_FILE = "mlflow_buffer_{stage}.jsonl"
REPLAYED_SUFFIX = ".replayed"
STANDALONE_STEP = "step_{step}"
STOP_FILE = "raydpo_stop_requested"
OOM_MARKER = "raydpo_oom.json"
LOG_FILE = "raydpo.log"
MERGED_DIR = "sft-merged"
MERGED_MARKER = "raydpo_merged.json"
MODELS_DIR = "models"
REFERENCE_DIR = "reference"
REFERENCE_MARKER = "_SUCCESS"
REFERENCE_SPLIT_COLUMN = "split"  # a building cache's hive partition column: its values become the split folders
REFERENCE_SCORED = "_SCORED"  # the training workers finished scoring a building cache (`raydpo.train.ref_scoring`)
DIGEST_MEMO = "digests.json"
FAULTS_DIR = "faults_fired"
NODE_CHECK = ".raydpo_node_check-{token}"
WRITE_CHECK = ".raydpo_write_check-{token}"
CHECKPOINT_GLOB = "checkpoint_*"  # Ray Train's name for the checkpoints of a run folder
# inside a checkpoint
ADAPTER_DIR = "adapter"
DS_DIR = "deepspeed"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_r{rank}.pt"
MANIFEST = "manifest_r{rank}.json"
COPY_DONE = ".raydpo_copy_complete"  # written last into a node-local copy of a remote folder


# -- locations -----------------------------------------------------------------------------


def is_remote(loc: str | Path) -> bool:
    """A URI with a scheme (``s3://``, ``gs://``, ...) other than ``file://``: not a local path."""
    s = str(loc)
    return "://" in s and not s.startswith("file://")


def root(storage_path: str | Path) -> str:
    """``run.storage_path`` as a location: a URI without its trailing slash, or an absolute local path."""
    s = str(storage_path)
    if is_remote(s):
        return s.rstrip("/")
    if s.startswith("file://"):
        s = s[len("file://"):]
    return str(Path(s).expanduser().resolve())


def join(loc: str | Path, *names: str) -> str:
    """``loc/name/...``: the one place a storage location is joined."""
    s = str(loc)
    return posixpath.join(s, *names) if is_remote(s) else os.path.join(s, *names)


def name(loc: str | Path) -> str:
    return posixpath.basename(str(loc).rstrip("/"))


def parent(loc: str | Path) -> str:
    s = str(loc).rstrip("/")
    return posixpath.dirname(s) if is_remote(s) else os.path.dirname(s)


def run_dir(storage_path: str | Path, run_name: str) -> str:
    return join(root(storage_path), run_name)


def log_file(storage_path: str | Path, run_name: str) -> str:
    return join(run_dir(storage_path, run_name), LOG_FILE)


def merged_sft_dir(storage_path: str | Path, run_name: str) -> str:
    return join(run_dir(storage_path, run_name), MERGED_DIR)


def merged_marker(merged_dir: str | Path) -> str:
    return join(merged_dir, MERGED_MARKER)


def merged_markers(storage_path: str | Path) -> list[str]:
    """The merge markers of every run in this storage (another run's merge may be shared)."""
    top = root(storage_path)
    return sorted(m for run in list_dirs(top) if exists(m := merged_marker(join(top, run, MERGED_DIR))))


def model_dir(storage_path: str | Path, model_name: str) -> str:
    """A model every node reads (the built-in tiny Llama), published into run storage."""
    return join(root(storage_path), MODELS_DIR, model_name)


def reference_dir(storage_path: str | Path, key: str | None = None) -> str:
    """The reference caches' folder, or one cache's folder by its content key."""
    d = join(root(storage_path), REFERENCE_DIR)
    return join(d, key) if key else d


def digest_memo(memo_dir: str | Path) -> str:
    return join(memo_dir, DIGEST_MEMO)


def reference_split(cache: str | Path, split: str) -> str:
    return join(cache, split)


def reference_marker(cache: str | Path) -> str:
    return join(cache, REFERENCE_MARKER)


def reference_building(cache: str | Path, pid: int) -> str:
    """Where a cache is built before it is moved into place (beside it, hidden)."""
    return join(parent(cache), f".{name(cache)}.building-{pid}")


def reference_part_dir(building: str | Path, split: str) -> str:
    """Where a building cache's rows of ``split`` are written, by Ray Data or by the training workers."""
    return partition_dir(building, REFERENCE_SPLIT_COLUMN, split)


def reference_part(building: str | Path, split: str, rank: int) -> str:
    """One training worker's scored rows of ``split`` (`raydpo.train.ref_scoring`)."""
    return join(reference_part_dir(building, split), f"part-r{rank:05d}.parquet")


def reference_scored(building: str | Path) -> str:
    """Rank 0's mark that every worker wrote its part: the driver may commit the folder."""
    return join(building, REFERENCE_SCORED)


def partition_dir(folder: str | Path, column: str, value: str) -> str:
    """The folder a hive-partitioned parquet write (Ray Data's ``partition_cols``) puts a value in."""
    return join(folder, f"{column}={value}")


def stage_dir(storage_path: str | Path, run_name: str, stage: str) -> str:
    """Ray Train's folder of one stage's run: checkpoints, the run record, the stop file."""
    return join(root(storage_path), f"{run_name}-{stage}")


def standalone_dir(storage_path: str | Path, run_name: str, stage: str) -> Path:
    # not through `root`: the torchrun runner writes relative to its cwd, as it always has (local only)
    return Path(storage_path) / f"{run_name}-{stage}-standalone"


def standalone_step_dir(standalone: str | Path, step: int) -> Path:
    return Path(standalone) / STANDALONE_STEP.format(step=step)


def tune_dir(storage_path: str | Path, tune_name: str) -> str:
    return join(root(storage_path), tune_name)


def write_check_file(storage_path: str | Path, token: str) -> str:
    """The object written and deleted to learn that a storage URI takes writes (`check_storage`)."""
    return join(root(storage_path), WRITE_CHECK.format(token=token))


# -- inside a stage folder -----------------------------------------------------------------


def run_record(stage_folder: str | Path) -> str:
    return join(stage_folder, RUN_RECORD)


def stop_file(stage_folder: str | Path) -> str:
    return join(stage_folder, STOP_FILE)


def oom_marker(stage_folder: str | Path) -> str:
    return join(stage_folder, OOM_MARKER)


def spill_file(stage_folder: str | Path, stage: str) -> str:
    """Where a stage's workers write the metrics they could not send: beside its checkpoints."""
    return join(stage_folder, SPILL_FILE.format(stage=stage))


def replayed_file(spill: str | Path) -> str:
    """Where `raydpo tracking replay` moves a spill file once every point in it is sent."""
    return f"{spill}{REPLAYED_SUFFIX}"


def faults_dir(stage_folder: str | Path) -> str:
    return join(stage_folder, FAULTS_DIR)


def checkpoints(stage_folder: str | Path) -> list[str]:
    """The stage folder's checkpoint folders, in name order (not checked for completeness)."""
    return [join(stage_folder, d) for d in list_dirs(stage_folder, CHECKPOINT_GLOB)]


def set_aside_name(folder: str | Path, stamp: str) -> str:
    """Where ``--restart`` moves a stage's earlier folder (kept, never deleted)."""
    return join(parent(folder), f"{name(folder)}.before-restart-{stamp}")


# -- inside a checkpoint -------------------------------------------------------------------


def adapter_dir(checkpoint: str | Path) -> str:
    return join(checkpoint, ADAPTER_DIR)


def deepspeed_dir(checkpoint: str | Path) -> str:
    return join(checkpoint, DS_DIR)


def state_file(checkpoint: str | Path) -> str:
    return join(checkpoint, STATE_FILE)


def rng_file(checkpoint: str | Path, rank: int) -> str:
    return join(checkpoint, RNG_FILE.format(rank=rank))


def manifest_file(checkpoint: str | Path, rank: int) -> str:
    return join(checkpoint, MANIFEST.format(rank=rank))


# -- I/O: local paths and URIs alike, through pyarrow.fs -------------------------------------


@lru_cache(maxsize=16)
def _remote_fs(prefix: str):
    """``(filesystem, its path of the bucket)`` per ``scheme://bucket``, resolved once by pyarrow
    (creating an S3 client is not free)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(prefix)


def filesystem(loc: str | Path):
    """``(pyarrow filesystem, path on it)`` of a location, as Ray Train resolves its storage
    (``pyarrow.fs.FileSystem.from_uri``)."""
    import pyarrow.fs as pafs

    s = str(loc)
    if not is_remote(s):
        return pafs.LocalFileSystem(), s[len("file://"):] if s.startswith("file://") else s
    scheme, rest = s.split("://", 1)
    bucket, _, key = rest.partition("/")
    fs, bucket_path = _remote_fs(f"{scheme}://{bucket}")
    return fs, posixpath.join(bucket_path, key).rstrip("/") if key else bucket_path


def _info(loc: str | Path):
    fs, path = filesystem(loc)
    return fs.get_file_info(path)


def _kind(loc: str | Path) -> str:
    """``"File"``, ``"Directory"`` or ``"NotFound"`` (pyarrow's `FileType` names)."""
    return _info(loc).type.name


def exists(loc: str | Path) -> bool:
    return _kind(loc) != "NotFound"


def is_file(loc: str | Path) -> bool:
    return _kind(loc) == "File"


def is_dir(loc: str | Path) -> bool:
    return _kind(loc) == "Directory"


def read_bytes(loc: str | Path) -> bytes:
    """The file's bytes; `FileNotFoundError` (an `OSError`) when it is not there."""
    fs, path = filesystem(loc)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(loc: str | Path) -> str:
    return read_bytes(loc).decode()


def write_bytes(loc: str | Path, data: bytes) -> None:
    """Whole or not at all: a local file is written beside its name and renamed into place; an
    object store's PUT is atomic already. Parent folders are made."""
    s = str(loc)
    if is_remote(s):
        fs, path = filesystem(s)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    p = Path(filesystem(s)[1])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def write_text(loc: str | Path, text: str) -> None:
    write_bytes(loc, text.encode())


def append_text(loc: str | Path, text: str) -> None:
    """Add ``text`` at the end (an object store has no append: the object is rewritten)."""
    if is_remote(loc):
        old = read_bytes(loc) if exists(loc) else b""
        write_bytes(loc, old + text.encode())
        return
    p = Path(filesystem(loc)[1])
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_json(loc: str | Path) -> dict | None:
    """The JSON object in a file, or None when it is missing or unreadable."""
    try:
        return json.loads(read_text(loc))
    except (OSError, ValueError):
        return None


def makedirs(loc: str | Path) -> None:
    fs, path = filesystem(loc)
    fs.create_dir(path, recursive=True)


def remove(loc: str | Path) -> None:
    """A file or a whole folder; nothing when it is not there."""
    fs, path = filesystem(loc)
    kind = _kind(loc)
    if kind == "Directory":
        fs.delete_dir(path)
    elif kind == "File":
        fs.delete_file(path)


def move(src: str | Path, dst: str | Path) -> None:
    """Rename (local: one atomic rename; an object store: copy, then delete the source)."""
    if not is_remote(src):
        os.replace(filesystem(src)[1], filesystem(dst)[1])
        return
    if is_dir(src):
        copy_tree(src, dst)
    else:  # copy + delete: not every object store implements a move (Azure without hierarchical namespace)
        fs, path = filesystem(src)
        fs.copy_file(path, filesystem(dst)[1])
    remove(src)


def list_dirs(loc: str | Path, pattern: str = "*") -> list[str]:
    """Names of the sub-folders of ``loc`` matching ``pattern``, sorted; [] when it is not there."""
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and fnmatch.fnmatch(i.base_name, pattern))


def walk_files(loc: str | Path) -> dict[str, tuple[int, int]]:
    """Every file under a folder: ``{relative name: (size, mtime_ns)}``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    base = path.rstrip("/") + "/"
    return {i.path[len(base):]: (int(i.size or 0), int(i.mtime_ns or 0))
            for i in infos if i.type == pafs.FileType.File}


def copy_tree(src: str | Path, dst: str | Path) -> None:
    """Copy a folder between any two locations (pyarrow's copy, many files at once)."""
    import pyarrow.fs as pafs

    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dst)
    if not is_remote(dst):
        Path(dpath).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs, use_threads=True)


def upload(local: str | Path, loc: str | Path) -> None:
    """Put a local folder at ``loc``, replacing what was there."""
    remove(loc)
    copy_tree(str(local), loc)
