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

Torch-free and Ray-free: the driver, the workers and the tools all ask it.
"""

from __future__ import annotations

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
REFERENCE_DIR = "reference"
REFERENCE_MARKER = "_SUCCESS"
DIGEST_MEMO = "digests.json"
FAULTS_DIR = "faults_fired"
CHECKPOINT_GLOB = "checkpoint_*"  # Ray Train's name for the checkpoints of a run folder
# inside a checkpoint
ADAPTER_DIR = "adapter"
DS_DIR = "deepspeed"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_r{rank}.pt"
MANIFEST = "manifest_r{rank}.json"


def root(storage_path: str | Path) -> Path:
    """``run.storage_path`` as an absolute local path."""
    return Path(storage_path).expanduser().resolve()


def run_dir(storage_path: str | Path, run_name: str) -> Path:
    return root(storage_path) / run_name


def log_file(storage_path: str | Path, run_name: str) -> Path:
    return run_dir(storage_path, run_name) / LOG_FILE


def merged_sft_dir(storage_path: str | Path, run_name: str) -> Path:
    return run_dir(storage_path, run_name) / MERGED_DIR


def merged_marker(merged_dir: str | Path) -> Path:
    return Path(merged_dir) / MERGED_MARKER


def merged_markers(storage_path: str | Path) -> list[Path]:
    """The merge markers of every run in this storage (another run's merge may be shared)."""
    return sorted(root(storage_path).glob(f"*/{MERGED_DIR}/{MERGED_MARKER}"))


def reference_dir(storage_path: str | Path, key: str | None = None) -> Path:
    """The reference caches' folder, or one cache's folder by its content key."""
    d = root(storage_path) / REFERENCE_DIR
    return d / key if key else d


def digest_memo(memo_dir: str | Path) -> Path:
    return Path(memo_dir) / DIGEST_MEMO


def reference_split(cache: str | Path, split: str) -> Path:
    return Path(cache) / split


def reference_marker(cache: str | Path) -> Path:
    return Path(cache) / REFERENCE_MARKER


def reference_building(cache: Path, pid: int) -> Path:
    """Where a cache is built before it is renamed into place (beside it, hidden)."""
    return cache.with_name(f".{cache.name}.building-{pid}")


def partition_dir(folder: str | Path, column: str, value: str) -> Path:
    """The folder a hive-partitioned parquet write (Ray Data's ``partition_cols``) puts a value in."""
    return Path(folder) / f"{column}={value}"


def stage_dir(storage_path: str | Path, run_name: str, stage: str) -> Path:
    """Ray Train's folder of one stage's run: checkpoints, the run record, the stop file."""
    return root(storage_path) / f"{run_name}-{stage}"


def standalone_dir(storage_path: str | Path, run_name: str, stage: str) -> Path:
    # not through `root`: the torchrun runner writes relative to its cwd, as it always has
    return Path(storage_path) / f"{run_name}-{stage}-standalone"


def standalone_step_dir(standalone: str | Path, step: int) -> Path:
    return Path(standalone) / STANDALONE_STEP.format(step=step)


def tune_dir(storage_path: str | Path, name: str) -> Path:
    return root(storage_path) / name


# -- inside a stage folder -----------------------------------------------------------------


def run_record(stage_folder: str | Path) -> Path:
    return Path(stage_folder) / RUN_RECORD


def stop_file(stage_folder: str | Path) -> Path:
    return Path(stage_folder) / STOP_FILE


def oom_marker(stage_folder: str | Path) -> Path:
    return Path(stage_folder) / OOM_MARKER


def spill_file(stage_folder: str | Path, stage: str) -> Path:
    """Where a stage's workers write the metrics they could not send: beside its checkpoints."""
    return Path(stage_folder) / SPILL_FILE.format(stage=stage)


def replayed_file(spill: str | Path) -> Path:
    """Where `raydpo tracking replay` moves a spill file once every point in it is sent."""
    return Path(f"{spill}{REPLAYED_SUFFIX}")


def faults_dir(stage_folder: str | Path) -> Path:
    return Path(stage_folder) / FAULTS_DIR


def checkpoints(stage_folder: str | Path) -> list[Path]:
    """The stage folder's checkpoint folders, in name order (not checked for completeness)."""
    return sorted(p for p in Path(stage_folder).glob(CHECKPOINT_GLOB) if p.is_dir())


def set_aside_name(folder: Path, stamp: str) -> Path:
    """Where ``--restart`` moves a stage's earlier folder (kept, never deleted)."""
    return folder.with_name(f"{folder.name}.before-restart-{stamp}")


# -- inside a checkpoint -------------------------------------------------------------------


def adapter_dir(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / ADAPTER_DIR


def deepspeed_dir(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / DS_DIR


def state_file(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / STATE_FILE


def rng_file(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / RNG_FILE.format(rank=rank)


def manifest_file(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / MANIFEST.format(rank=rank)
