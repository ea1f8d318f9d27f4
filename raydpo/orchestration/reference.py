"""Reference log-probs computed once, by Ray Data batch inference, and cached by content.

The reference log-probs depend only on the frozen reference model (the base, or the merged SFT
model) and the tokenized pairs — never on beta or the learning rate — so DPO (by default) and
every Tune trial read them from parquet instead of running a second forward every step. The
model is loaded exactly as the trainer loads it (same quantization, same k-bit preparation, a
fresh adapter) and scored with the adapter disabled through the training forward itself
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
import warnings
from pathlib import Path

from raydpo import storage, storage_copy
from raydpo.config import BUILTIN_SOURCE, Config
from raydpo.tracking.terminal import echo

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
SPLITS = ("train", "eval")
SPLIT_COLUMN = "split"  # tags the rows of the one scoring pass; it becomes the folder, never a column


class RefLogps:
    """Ray Data callable: tokenized DPO rows → the same rows plus reference log-prob sums."""

    def __init__(self, cfg_dict: dict, base_path: str, use_gpu: bool = False):
        import torch

        from raydpo.models.factory import load_model
        from raydpo.data.tokenizer import load_tokenizer

        cfg = Config.from_dict(cfg_dict)
        self.dpo = cfg.dpo
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.pad = load_tokenizer(base_path).pad_token_id
        self.model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=base_path, device=self.device)
        self.model.eval()

    def __call__(self, batch):
        import pyarrow as pa

        from raydpo.data.collate import collate_dpo, ragged
        from raydpo.models.pairs import reference_logps

        cols = {k: ragged(batch[k].to_pylist())
                for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
        b = collate_dpo(cols, self.pad, share_prefix=self.dpo.share_prefix, pack=self.dpo.padding_free)
        b = {k: v.to(self.device) for k, v in b.items()}
        c, r = reference_logps(self.model, b, completion_only=self.dpo.completion_only_logits)
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
    return hashlib.sha256(json.dumps({"data": d, "source": src}, sort_keys=True).encode()).hexdigest()


CACHE_LAYOUT = 2  # 2: rows carry their stable row_id (the training order's key)


def cache_key(cfg: Config, base_path: str, tok_path: str | None = None) -> tuple[str, dict]:
    """``(key, parts)``: the reference's content, the tokenizer's, the data's, and the settings
    that change the numbers (dtype, attention kernel, quantization)."""
    memo = storage.reference_dir(cfg.run.storage_path)
    parts = {
        "layout": CACHE_LAYOUT,
        "reference": model_identity(base_path, cfg.model.revision if base_path == cfg.model.name_or_path else None, memo),
        "tokenizer": tokenizer_identity(tok_path or base_path, cfg.model.revision),
        "data": data_fingerprint(cfg, memo),
        "numerics": hashlib.sha256(json.dumps({
            "dtype": cfg.model.dtype, "attn": cfg.model.attn_implementation,
            "quantization": cfg.quantization.model_dump(mode="json")}, sort_keys=True).encode()).hexdigest(),
    }
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
    (reference, tokenizer, data) content and stored as parquet under the run storage. An empty
    split is None (with a warning for eval; an empty train split is an error)."""
    from ray.data import ActorPoolStrategy

    from raydpo.data.pipeline import build_datasets
    from raydpo.orchestration.resources import reference_needs, reference_pool_size, wait_for_resources

    key, parts = cache_key(cfg, base_path, tok_path)
    root = storage.reference_dir(cfg.run.storage_path, key)
    marker = valid_cache(root)
    if marker is None:
        if storage.exists(root):
            progress(f"[reference] {root} is incomplete or damaged: rebuilding it")
            storage.remove(root)
        progress(f"[reference] computing reference log-probs once into {root}")
        tmp = storage.reference_building(root, os.getpid())
        storage.remove(tmp)
        storage.makedirs(tmp)
        wait_for_resources(cfg, reference_needs(cfg), "reference", progress)
        train, evals = build_datasets(cfg, "dpo", tok_path)
        s, replica = cfg.scaling, cfg.scaling.replica_resources()
        # one execution scores both splits, tagged and written to their own folders: one pool of
        # model replicas starts once, not once per split
        both = train.map_batches(_tagged, fn_kwargs={"split": "train"}, batch_format="pyarrow").union(
            evals.map_batches(_tagged, fn_kwargs={"split": "eval"}, batch_format="pyarrow"))
        both.map_batches(RefLogps, fn_constructor_args=(cfg.to_dict(), base_path, s.use_gpu),
                         batch_size=cfg.dpo.per_device_batch_size * 4, batch_format="pyarrow",
                         compute=ActorPoolStrategy(min_size=1, max_size=reference_pool_size(cfg)),
                         num_cpus=replica["CPU"], num_gpus=replica.get("GPU", 0)
                         ).write_parquet(tmp, partition_cols=[SPLIT_COLUMN])
        commit_cache(tmp, root, {"key": parts, "base": base_path})
        marker = valid_cache(root)
        if marker is None:
            raise RuntimeError(f"the reference cache {root} is not complete after building it")
    else:
        progress(f"[reference] reusing reference log-probs in {root} (same reference, tokenizer and data)")
    if marker["rows"]["train"] == 0:
        raise RuntimeError("no training pairs: the train split is empty (check data.source and data.eval_fraction)")
    train_ds = read_split(storage.reference_split(root, "train"), cfg.data.tokenize_num_cpus)
    if marker["rows"]["eval"] == 0:
        warnings.warn("the eval split is empty: DPO trains without evaluation (raise data.eval_fraction to get one)",
                      stacklevel=2)
        progress("[reference] warning: the eval split is empty; training runs without evaluation")
        return train_ds, None
    return train_ds, read_split(storage.reference_split(root, "eval"), cfg.data.tokenize_num_cpus)


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
