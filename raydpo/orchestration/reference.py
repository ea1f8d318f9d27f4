"""Reference log-probs computed once, by Ray Data batch inference, and cached by content.

The reference log-probs depend only on the frozen reference model (the base, or the merged SFT
model) and the tokenized pairs — never on beta or the learning rate — so DPO (by default) and
every Tune trial read them from parquet instead of running a second forward every step. The
model is loaded exactly as the trainer loads it (same quantization, same k-bit preparation, a
fresh adapter, cast as the training engine casts it) and scored with the adapter disabled through the training forward itself
(`raydpo.models.pairs.reference_logps`), so the stored values are the ones the on-the-fly path computes.

The cache key is content, never a path (TRL keys its precomputed reference on the weights and
the dataset fingerprint the same way): a digest of the reference weights (for a merged SFT
model, of its base and of the SFT adapter files), of the tokenizer files, and a fingerprint of
the data (the source's bytes or generator settings plus every data setting tokenization reads).
A new SFT adapter written under the same run name therefore gets fresh log-probs. A cache folder
is built beside its final name and renamed into place with its marker
(`raydpo.storage.reference_marker`, holding the row count of every split) written last; a folder
without a valid marker, or whose parquet row counts disagree with it, is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from raydpo import storage, storage_copy
from raydpo.config import BUILTIN_SOURCE, Config
from raydpo.data.reach import Want
from raydpo.tracking.terminal import echo

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
SPLITS = ("train", "eval")
SPLIT_COLUMN = storage.REFERENCE_SPLIT_COLUMN  # tags the rows of the one scoring pass; it becomes the folder


class RefLogps:
    """Ray Data callable: tokenized DPO rows → the same rows plus reference log-prob sums.

    The model is the policy at step 0 as a training worker holds it: loaded the same way and cast
    as the training engine casts it (`raydpo.train.deepspeed.engine_cast_dtype`: bf16 DeepSpeed
    casts every weight to bf16), so the stored sums are the policy's own at step 0 in every
    precision, not those of the fp32-upcast model the loader returns. Exactly, bit for bit, in the
    padding-free layout (``dpo.padding_free``, the default: attention per sequence, so a pair's
    numbers do not depend on the other pairs of its batch). In a padded layout under bf16 a pair's
    log-probs, the policy's own too, depend on its batch's padded length (by ~1e-6 of their value
    on CPU): the precomputed reference is that close, the per-step one exact.

    DPO from an SFT adapter with ``dpo.sft_reference: adapter``: the step-0 policy is that
    adapter on the base, and the reference its frozen copy (`raydpo.models.factory.load_stage_model`);
    scored through the copy, the same tensors as the adapter, so the stored sums are the step-0
    policy's (adapter enabled), as the per-step path's are."""

    def __init__(self, cfg_dict: dict, base_path: str, use_gpu: bool = False):
        import torch

        from raydpo.data.tokenizer import load_tokenizer
        from raydpo.models.factory import load_stage_model
        from raydpo.train.deepspeed import engine_cast_dtype

        cfg = Config.from_dict(cfg_dict)
        self.dpo = cfg.dpo
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.pad = load_tokenizer(base_path).pad_token_id
        self.model = load_stage_model(cfg, "dpo", base_path=base_path, device=self.device,
                                      engine_dtype=engine_cast_dtype(cfg, use_gpu))
        self.model.eval()

    def __call__(self, batch):
        import pyarrow as pa

        from raydpo.data.collate import collate_dpo, ragged
        from raydpo.models.pairs import head_options, reference_logps

        cols = {k: ragged(batch[k].to_pylist())
                for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
        b = collate_dpo(cols, self.pad, share_prefix=self.dpo.share_prefix, pack=self.dpo.padding_free)
        b = {k: v.to(self.device) for k, v in b.items()}
        c, r = reference_logps(self.model, b, **head_options(self.dpo))
        return batch.append_column(REF_COLUMNS[0], pa.array(c.cpu().numpy(), type=pa.float32())).append_column(
            REF_COLUMNS[1], pa.array(r.cpu().numpy(), type=pa.float32()))


def _tagged(batch, split: str):
    import pyarrow as pa

    return batch.append_column(SPLIT_COLUMN, pa.array([split] * batch.num_rows, type=pa.string()))


# -- content digests -----------------------------------------------------------------------


def files_digest(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """sha256 over a file, or a folder's files (relative names + bytes, sorted; hidden files and
    raydpo's own markers skipped). Remembered in ``memo_dir`` by (path, size, mtime), so a 7B
    model's weights are read once, not at every run. A folder in an object store is digested
    from this node's copy of it (`raydpo.storage_copy.local_copy`)."""
    p = Path(storage_copy.local_copy(path)).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(p).parts) and f.name not in (storage.MERGED_MARKER,))
    stat = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    stamp = hashlib.sha256(json.dumps(stat).encode()).hexdigest()
    memo_file = storage.digest_memo(memo_dir) if memo_dir else None
    memo = (storage.read_json(memo_file) if memo_file else None) or {}
    if memo.get(str(p), {}).get("stamp") == stamp:
        return memo[str(p)]["digest"]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    if memo_file:
        memo[str(p)] = {"stamp": stamp, "digest": digest}
        storage.write_text(memo_file, json.dumps(memo))
    return digest


def model_identity(path: str, revision: str | None, memo_dir: str | Path | None = None) -> str:
    """What the reference weights are. A merged SFT folder: its base's identity + the SFT adapter
    files' digest (recorded by the merge). A local folder: its files' digest. A hub id: id and
    revision (pin ``model.revision`` to a commit for a cache that can never go stale)."""
    m = storage.read_json(storage.merged_marker(path)) or {}
    if m.get("adapter_digest") and m.get("base_identity"):
        return hashlib.sha256(f"{m['base_identity']}+{m['adapter_digest']}".encode()).hexdigest()
    if storage.is_remote(path) or Path(path).exists():
        return files_digest(path, memo_dir)
    return f"hub:{path}@{revision or 'main'}"


def tokenizer_identity(path: str, revision: str | None) -> str:
    p = Path(storage_copy.local_copy(path, only=storage_copy.is_tokenizer_file))  # not the weights
    if not p.is_dir():
        return f"hub:{path}@{revision or 'main'}"
    h = hashlib.sha256()
    for f in sorted(p.glob("*")):
        if f.is_file() and ("token" in f.name or "vocab" in f.name or "merges" in f.name or "chat_template" in f.name):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def data_fingerprint(cfg: Config, memo_dir: str | Path | None = None) -> str:
    """The tokenized pairs are a pure function of the source's content, the data settings and
    the tokenizer (hashed separately): this hashes the first two."""
    d = cfg.data.model_dump(mode="json")
    if cfg.data.source == BUILTIN_SOURCE:
        from raydpo.data.sample import SAMPLE_VERSION

        src = f"sample-v{SAMPLE_VERSION}"
    elif Path(cfg.data.source).exists():
        src = files_digest(cfg.data.source, memo_dir)
    else:
        src = f"hub:{cfg.data.source}"
    from raydpo.data.tokenize import TOKENIZE_VERSION  # the tokenization rules themselves

    return hashlib.sha256(json.dumps({"data": d, "source": src, "tokenize": TOKENIZE_VERSION},
                                     sort_keys=True).encode()).hexdigest()


# the libraries whose kernels and casts make the reference's numbers
NUMERICS_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed")


def numerics_identity(cfg: Config) -> str:
    """What, besides the weights and the tokens, sets the reference's numbers: the loaded dtype,
    the attention kernel, the quantization, the training engine's cast (`RefLogps` scores in the
    policy's precision), the batch layout and the logits' positions (a padded bf16 layout moves
    the last bits), and the versions of the libraries that compute them (read from the installed
    metadata, without importing them: the driver's, which the workers share)."""
    from importlib import metadata

    from raydpo.train.deepspeed import engine_cast_dtype

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return hashlib.sha256(json.dumps({
        "dtype": cfg.model.dtype, "attn": cfg.model.attn_implementation,
        "quantization": cfg.quantization.model_dump(mode="json"),
        "engine_cast": engine_cast_dtype(cfg, cfg.scaling.use_gpu),
        "layout": [cfg.dpo.share_prefix, cfg.dpo.padding_free, cfg.dpo.completion_only_logits,
                   cfg.dpo.fused_lm_head, cfg.dpo.lm_head_tile_tokens],
        "versions": {name: version(name) for name in NUMERICS_LIBRARIES}}, sort_keys=True).encode()).hexdigest()


CACHE_LAYOUT = 2  # 2: rows carry their stable row_id (the training order's key)


def cache_key(cfg: Config, base_path: str, tok_path: str | None = None) -> tuple[str, dict]:
    """``(key, parts)``: the reference's content, the tokenizer's, the data's, and the settings
    that change the numbers (`numerics_identity`: dtype, attention kernel, quantization, the engine's cast, the layout, library versions)."""
    memo = storage.reference_dir(cfg.run.storage_path)
    parts = {
        "layout": CACHE_LAYOUT,
        "reference": model_identity(base_path, cfg.model.revision if base_path == cfg.model.name_or_path else None, memo),
        "tokenizer": tokenizer_identity(tok_path or base_path, cfg.model.revision),
        "data": data_fingerprint(cfg, memo),
        "numerics": numerics_identity(cfg),
    }
    if cfg.dpo.trains_sft_adapter:  # the reference is ``base_path`` + the SFT adapter, unmerged
        parts["sft_adapter"] = files_digest(cfg.dpo.trains_sft_adapter, memo)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], parts


# -- the cache -----------------------------------------------------------------------------


def parquet_files(folder: str) -> dict[str, int]:
    """``{location: bytes}`` of a split folder's parquet files (local or in an object store)."""
    return {storage.join(folder, f): size for f, (size, _) in storage.walk_files(folder).items()
            if f.endswith(".parquet") and "/" not in f}


def parquet_rows(folder: str) -> int:
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(folder)
    return sum(pq.ParquetFile(fs.open_input_file(storage.filesystem(f)[1])).metadata.num_rows
               for f in parquet_files(folder))


def valid_cache(root: str) -> dict | None:
    """The marker of a complete cache folder, or None (no marker, unreadable, row counts off)."""
    try:
        marker = storage.read_json(storage.reference_marker(root))
        return marker if marker is not None and all(
            parquet_rows(storage.reference_split(root, s)) == int(marker["rows"][s]) for s in SPLITS) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reference_datasets(cfg: Config, base_path: str, tok_path: str, progress=echo):
    """(train, eval) DPO datasets with reference log-prob columns, computed at most once per
    (reference, tokenizer, data) content and stored as parquet under the run storage. Only the
    rows the run reads are scored (`raydpo.data.reach`); a rerun that reads more (a higher
    ``max_steps``) scores the rows the cache lacks and adds them. An empty split is None (with a
    warning for eval; an empty train split is an error)."""
    from raydpo.data.pipeline import run_wants

    key, parts = cache_key(cfg, base_path, tok_path)
    root = storage.reference_dir(cfg.run.storage_path, key)
    want = run_wants(cfg, "dpo")
    marker = valid_cache(root)
    if marker is not None and Want.from_json(marker.get("reach")).covers(want):
        progress(f"[reference] reusing reference log-probs in {root} (same reference, tokenizer and data)")
    else:
        marker = build_cache(cfg, root, {"key": parts, "base": base_path}, base_path, tok_path, marker, progress)
    if marker["rows"]["train"] == 0:
        raise RuntimeError("no training pairs: the train split is empty (check data.source and data.eval_fraction)")
    train_ds = read_split(storage.reference_split(root, "train"), cfg.data.tokenize_num_cpus)
    if marker["rows"]["eval"] == 0:
        warnings.warn("the eval split is empty: DPO trains without evaluation (raise data.eval_fraction to get one)",
                      stacklevel=2)
        progress("[reference] warning: the eval split is empty; training runs without evaluation")
        return train_ds, None
    eval_ds = read_split(storage.reference_split(root, "eval"), cfg.data.tokenize_num_cpus)
    return train_ds, the_run_eval_rows(eval_ds, cfg.data.seed, want.eval, int(marker["rows"]["eval"]))


@dataclass(frozen=True)
class WorkerScoring:
    """A cache the training workers fill at the fit's start (`raydpo.train.ref_scoring`): where they
    write (``building``), where it goes (``root``) and its marker's contents."""

    building: str
    root: str
    about: dict


def fit_reference(cfg: Config, base_path: str, tok_path: str, progress=echo):
    """``(train, eval, scoring)``: the cached reference's datasets and None when the cache holds
    the run's rows (`reference_datasets`); otherwise, with ``dpo.reference_scoring: workers`` and
    no cache at all, the tokenized datasets without reference columns and the `WorkerScoring` the
    fit's workers carry out. A cache that holds only part of the rows grows through the Ray Data
    pass (its rows already scored are not scored again)."""
    from raydpo.data.pipeline import build_datasets, find_reach, run_wants

    key, parts = cache_key(cfg, base_path, tok_path)
    root = storage.reference_dir(cfg.run.storage_path, key)
    if cfg.dpo.reference_scoring != "workers" or valid_cache(root) is not None:
        return (*reference_datasets(cfg, base_path, tok_path, progress), None)
    if storage.exists(root):
        progress(f"[reference] {root} is incomplete or damaged: rebuilding it")
        storage.remove(root)
    t0 = time.perf_counter()
    reach = find_reach(cfg, "dpo", tok_path, run_wants(cfg, "dpo"))
    progress(f"[reference] the run reads {reach.describe()}: found in one pass over the source "
             f"({time.perf_counter() - t0:.0f}s)")
    if reach.n_train == 0:
        raise RuntimeError("no training pairs: the train split is empty (check data.source and data.eval_fraction)")
    progress(f"[reference] computing reference log-probs once into {root}: by the training workers, at the "
             "fit's start, with the model they load (dpo.reference_scoring: workers)")
    building = storage.reference_building(root, os.getpid())
    storage.remove(building)
    storage.makedirs(building)
    about = {"key": parts, "base": base_path, "reach": reach.want.to_json(), "n": [reach.n_train, reach.n_eval]}
    train, evals = build_datasets(cfg, "dpo", tok_path, reach)
    return train, evals, WorkerScoring(building, root, about)


def commit_scoring(scoring: WorkerScoring | None, progress=echo) -> None:
    """After the fit: the workers' cache into place when they finished scoring (even if training
    failed later), else their partial folder removed."""
    if scoring is None:
        return
    if not storage.exists(storage.reference_scored(scoring.building)):
        storage.remove(scoring.building)
        return
    commit_cache(scoring.building, scoring.root, scoring.about)
    if valid_cache(scoring.root) is None:
        progress(f"[reference] warning: the workers' reference log-probs did not make a valid cache in {scoring.root}")


def build_cache(cfg: Config, root: str, about: dict, base_path: str, tok_path: str, marker: dict | None,
                progress) -> dict:
    """Score the rows the run reads that ``root`` lacks (all of them without a valid ``marker``)
    and commit them; the new marker."""
    from raydpo.data.pipeline import build_datasets, find_reach, run_wants
    from raydpo.orchestration.resources import reference_needs, wait_for_resources

    if marker is None and storage.exists(root):
        progress(f"[reference] {root} is incomplete or damaged: rebuilding it")
        storage.remove(root)
    t0 = time.perf_counter()
    want = run_wants(cfg, "dpo")
    if marker is not None:  # what the cache already holds is read whole either way: ask for at least that
        want = want.widest(Want.from_json(marker.get("reach")))
    reach = find_reach(cfg, "dpo", tok_path, want)
    progress(f"[reference] the run reads {reach.describe()}: found in one pass over the source "
             f"({time.perf_counter() - t0:.0f}s)")
    have = {s: cached_ids(storage.reference_split(root, s)) for s in SPLITS} if marker else {}
    progress(f"[reference] computing reference log-probs once into {root}" if marker is None else
             f"[reference] adding the rows {root} lacks (it holds {marker['rows']['train']} train / "
             f"{marker['rows']['eval']} eval pairs)")
    tmp = storage.reference_building(root, os.getpid())
    storage.remove(tmp)
    storage.makedirs(tmp)
    wait_for_resources(cfg, reference_needs(cfg), "reference", progress)
    train, evals = build_datasets(cfg, "dpo", tok_path, reach, skip=have)
    score(cfg, base_path, train, evals, tmp)
    reach_json = reach.want.to_json()
    if marker is None:
        commit_cache(tmp, root, {**about, "reach": reach_json, "n": [reach.n_train, reach.n_eval]})
    else:
        add_to_cache(tmp, root, {**marker, "reach": reach_json, "n": [reach.n_train, reach.n_eval]})
    marker = valid_cache(root)
    if marker is None:
        raise RuntimeError(f"the reference cache {root} is not complete after building it")
    return marker


def score(cfg: Config, base_path: str, train, evals, out: str) -> None:
    """Both splits scored by one pool of model replicas (it starts once, not once per split), each
    row tagged with its split and written to that split's folder under ``out``."""
    from ray.data import ActorPoolStrategy

    from raydpo.orchestration.resources import reference_pool_size

    s, replica = cfg.scaling, cfg.scaling.replica_resources()
    both = train.map_batches(_tagged, fn_kwargs={"split": "train"}, batch_format="pyarrow").union(
        evals.map_batches(_tagged, fn_kwargs={"split": "eval"}, batch_format="pyarrow"))
    both.map_batches(RefLogps, fn_constructor_args=(cfg.to_dict(), base_path, s.use_gpu),
                     batch_size=cfg.dpo.per_device_batch_size * 4, batch_format="pyarrow",
                     compute=ActorPoolStrategy(min_size=1, max_size=reference_pool_size(cfg)),
                     num_cpus=replica["CPU"], num_gpus=replica.get("GPU", 0)
                     ).write_parquet(out, partition_cols=[SPLIT_COLUMN])


def cached_ids(folder: str):
    """The ``row_id`` of every row of a cached split (none: an empty array)."""
    import numpy as np
    import pyarrow.parquet as pq

    files = parquet_files(folder)
    if not files:
        return np.empty(0, np.int64)
    fs, _ = storage.filesystem(folder)
    return np.concatenate([pq.read_table(storage.filesystem(f)[1], columns=["row_id"], filesystem=fs)["row_id"]
                           .to_numpy() for f in files]).astype(np.int64)


def the_run_eval_rows(eval_ds, seed: int, k: int | None, held: int):
    """The eval rows this run reads out of a cached eval split that may hold more (a cache built
    by a run with a larger ``eval_max_batches``): the first ``k`` of the eval order."""
    import numpy as np

    from raydpo.data.reach import EVAL_EPOCH, smallest
    from raydpo.data.order import order_key

    if k is None or held <= k:
        return eval_ds
    ids = np.concatenate([np.asarray(b["row_id"], np.int64) for b in eval_ds.iter_batches(
        batch_size=None, batch_format="numpy")])
    keep = smallest(order_key(ids, seed, EVAL_EPOCH), ids, k)[1]
    return eval_ds.map_batches(_rows_in, fn_kwargs={"ids": keep}, batch_format="pyarrow")


def _rows_in(batch, ids):
    import numpy as np
    import pyarrow as pa

    return batch.filter(pa.array(np.isin(batch["row_id"].to_numpy(), ids)))


def commit_cache(tmp: str, root: str, about: dict) -> None:
    """A built cache into place, its marker (the row count of every split) written last. Local:
    the folder is renamed whole (a second driver that finished the same key first keeps its
    own). Object store (no rename): the splits are moved, then the marker goes in."""
    rows = {}
    for split in SPLITS:
        written = storage.partition_dir(tmp, SPLIT_COLUMN, split)
        if storage.is_dir(written):
            storage.move(written, storage.reference_split(tmp, split))
        rows[split] = parquet_rows(storage.reference_split(tmp, split))
    record = json.dumps({"rows": rows, **about})
    if storage.is_remote(root):
        if valid_cache(root) is not None:  # another driver finished the same key first: theirs is as good
            storage.remove(tmp)
            return
        storage.remove(root)  # an earlier commit that died half-way (no valid marker)
        for split in SPLITS:
            if storage.is_dir(storage.reference_split(tmp, split)):
                storage.move(storage.reference_split(tmp, split), storage.reference_split(root, split))
        storage.write_text(storage.reference_marker(root), record)
        storage.remove(tmp)
        return
    storage.write_text(storage.reference_marker(tmp), record)
    try:
        os.replace(tmp, root)
    except OSError:  # another driver finished the same key first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def add_to_cache(tmp: str, root: str, marker: dict) -> None:
    """Newly scored rows into a valid cache: each split's new parquet files (Ray names them
    uniquely per write) are moved beside the old ones, then the marker goes in with the new row
    counts. A driver that dies in between leaves counts that disagree: the cache is rebuilt."""
    rows = {}
    for split in SPLITS:
        written = storage.partition_dir(tmp, SPLIT_COLUMN, split)
        for f in parquet_files(written) if storage.is_dir(written) else {}:
            storage.move(f, storage.join(storage.reference_split(root, split), storage.name(f)))
        rows[split] = parquet_rows(storage.reference_split(root, split))
    storage.write_text(storage.reference_marker(root), json.dumps({**marker, "rows": rows}))
    storage.remove(tmp)


def read_split(folder: str, num_cpus: float, local_read_max_bytes: int | None = None):
    """One cached split as a Ray dataset. Parquet files of at most ``local_read_max_bytes`` in all
    (default: `raydpo.orchestration.ingest.LOCAL_SORT_MAX_BYTES`, the size the training stream
    handles in one block anyway) are read here, on the driver, into the object store: Ray Data's
    parquet read plans, samples and runs read tasks, seconds of fixed cost for the same rows
    (README, Performance). Larger splits are read by Ray Data's tasks. Row order is not a property
    of a split: training sorts it (`raydpo.orchestration.ingest.ordered_stream`), evaluation sums
    over it, and the eval prompts are picked by ``row_id``."""
    import ray

    from raydpo.orchestration.ingest import LOCAL_SORT_MAX_BYTES

    limit = LOCAL_SORT_MAX_BYTES if local_read_max_bytes is None else local_read_max_bytes
    if sum(parquet_files(folder).values()) <= limit:
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(folder)
        return ray.data.from_arrow(pq.read_table(path, filesystem=fs))
    return ray.data.read_parquet(folder, num_cpus=num_cpus)  # (ray_remote_args is deprecated in Ray 2.60)
