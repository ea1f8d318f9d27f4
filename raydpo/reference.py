"""Reference log-probs computed once, by Ray Data batch inference, and stored beside the data.

The reference log-probs depend only on the reference model (the SFT model) and the tokenized
pairs — never on beta or the learning rate — so a Tune search (or a plain run with
``dpo.reference=precomputed``) reads them from parquet instead of running a second forward
pass every step. The model is loaded exactly as the trainer loads it (same quantization, same
k-bit preparation, a fresh adapter) and evaluated with the adapter disabled, so the stored values
are the ones the on-the-fly path would compute.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from raydpo.config import Config

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class RefLogps:
    """Ray Data callable: tokenized DPO rows → the same rows plus reference log-prob sums."""

    def __init__(self, cfg_dict: dict, base_path: str, use_gpu: bool = False):
        import torch

        from raydpo.models import load_model, load_tokenizer

        cfg = Config.from_dict(cfg_dict)
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.pad = load_tokenizer(base_path).pad_token_id
        self.model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=base_path, device=self.device)
        self.model.eval()

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa
        import torch

        from raydpo.data.collate import collate_dpo
        from raydpo.losses import sequence_logps

        cols = {k: np.array(batch[k].to_pylist() + [None], dtype=object)[:-1]
                for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
        b = collate_dpo(cols, self.pad)
        with torch.no_grad(), self.model.disable_adapter():
            logits = self.model(input_ids=b["input_ids"].to(self.device),
                                attention_mask=b["attention_mask"].to(self.device)).logits
            lp = sequence_logps(logits, b["labels"].to(self.device)).cpu().numpy()
        n = batch.num_rows
        return batch.append_column(REF_COLUMNS[0], pa.array(lp[:n], type=pa.float32())).append_column(
            REF_COLUMNS[1], pa.array(lp[n:], type=pa.float32()))


def cache_key(cfg: Config, base_path: str) -> str:
    d = cfg.to_dict()
    blob = json.dumps({"base": base_path, "data": d["data"], "model": d["model"], "quantization": d["quantization"]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def inference_actors(cfg: Config) -> int:
    """How many model replicas the reference pass may run at once: it runs before training, so
    as many as training workers fit (every GPU, or every CPU Ray Data does not keep)."""
    import ray

    s, res = cfg.scaling, ray.cluster_resources()
    if s.use_gpu:
        return max(1, int(res.get("GPU", 0) // s.gpus_per_worker))
    return max(1, int((res.get("CPU", 1.0) - s.data_cpus) // max(s.cpus_per_worker, 0.5)))


def reference_datasets(cfg: Config, base_path: str, tok_path: str, progress=print):
    """(train, eval) DPO datasets with reference log-prob columns, computed at most once per
    (model, data) and stored as parquet under the run's storage."""
    import ray
    from ray.data import ActorPoolStrategy

    from raydpo.data.pipeline import build_datasets

    root = Path(cfg.run.storage_path).resolve() / "reference" / cache_key(cfg, base_path)
    done = root / "_SUCCESS"
    if not done.exists():
        progress(f"[reference] computing reference log-probs once into {root}")
        train, evals = build_datasets(cfg, "dpo", tok_path)
        s = cfg.scaling
        kw = dict(fn_constructor_args=(cfg.to_dict(), base_path, s.use_gpu), batch_size=cfg.dpo.per_device_batch_size * 4,
                  batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=inference_actors(cfg)),
                  num_cpus=0 if s.use_gpu else max(s.cpus_per_worker, 0.5), num_gpus=s.gpus_per_worker if s.use_gpu else 0)
        for name, ds in (("train", train), ("eval", evals)):
            ds.map_batches(RefLogps, **kw).write_parquet(str(root / name))
        done.write_text(json.dumps({"base": base_path}))
    else:
        progress(f"[reference] reusing reference log-probs in {root}")
    read = {"ray_remote_args": {"num_cpus": cfg.data.tokenize_num_cpus}}
    return ray.data.read_parquet(str(root / "train"), **read), ray.data.read_parquet(str(root / "eval"), **read)
