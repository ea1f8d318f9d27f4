"""``raydpo data stats``: run the pipeline on a source and account for every row."""

from __future__ import annotations

from typing import Any

from raydpo.config import Config
from raydpo.data.rows import REASONS, VALID


def _lengths(batch):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pa.table({k: pc.list_value_length(batch[f"{k}_input_ids"]) for k in ("prompt", "chosen", "rejected")}
                    | {"truncated": batch["truncated"]})


def _valid_only(batch):
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch["reason"], VALID))


def compute_stats(cfg: Config, tokenizer_name_or_path: str) -> dict[str, Any]:
    import numpy as np

    from raydpo.data.pipeline import tokenized, validated
    from raydpo.raycluster import ensure_ray

    ensure_ray()
    rows_ds = validated(cfg.data, "dpo").materialize()  # read + validate once, reused below
    rows = rows_ds.count()
    counts = {r["reason"]: int(r["count()"]) for r in rows_ds.groupby("reason").count().take_all()}
    valid_ds = rows_ds.map_batches(_valid_only, batch_format="pyarrow").materialize()
    valid = valid_ds.count()
    dropped = {r: counts.get(r, 0) for r in REASONS}
    dropped.update({r: c for r, c in counts.items() if r != VALID and r not in dropped})

    out: dict[str, Any] = {"source": cfg.data.source, "rows": rows, "valid": valid, "dropped": dropped,
                           "dpo_pairs": 0, "sft_blocks": 0, "truncated_pairs": 0, "train_pairs": 0, "eval_pairs": 0,
                           "token_lengths": {}, "example": None}
    if valid == 0:
        return out
    out["eval_pairs"] = int(valid_ds.sum("is_eval") or 0)
    out["train_pairs"] = valid - out["eval_pairs"]
    dpo = tokenized(valid_ds, cfg, "dpo", tokenizer_name_or_path).map_batches(_lengths, batch_format="pyarrow")
    lens = dpo.to_pandas()
    out["dpo_pairs"] = len(lens)
    out["truncated_pairs"] = int(lens["truncated"].sum())
    for k in ("prompt", "chosen", "rejected"):
        v = lens[k].to_numpy()
        out["token_lengths"][k] = {f"p{q}": int(np.percentile(v, q)) for q in (50, 90, 99)} | {"max": int(v.max())}
    out["sft_blocks"] = tokenized(valid_ds, cfg, "sft", tokenizer_name_or_path).count()
    ex = valid_ds.take(1)[0]
    out["example"] = {k: _short(ex[k]) for k in ("prompt", "chosen", "rejected")}
    return out


def _short(s: str, n: int = 300) -> str:
    return s if len(s) <= n else s[:n] + f"... [{len(s) - n} more chars]"


def format_stats(d: dict[str, Any]) -> str:
    lines = [f"source: {d['source']}",
             f"rows read: {d['rows']}   valid: {d['valid']}   dropped: {d['rows'] - d['valid']}"]
    for reason, n in d["dropped"].items():
        if n:
            lines.append(f"  dropped {reason}: {n}")
    lines.append(f"DPO pairs: {d['dpo_pairs']} (train {d['train_pairs']}, eval {d['eval_pairs']}; "
                 f"truncated {d['truncated_pairs']})   SFT blocks: {d['sft_blocks']}")
    for k, q in d["token_lengths"].items():
        lines.append(f"  {k:>8} tokens: " + "  ".join(f"{a}={b}" for a, b in q.items()))
    if d["example"]:
        lines.append("example:")
        for k, v in d["example"].items():
            lines.append(f"  [{k}] {v!r}")
    return "\n".join(lines)
