"""`raydpo.data.collate` as Ray collate classes, for ``iter_torch_batches(collate_fn=...)``.

Ray 2.47+ deprecates passing a plain function there; a `NumpyBatchCollateFn` subclass gets the
same ``dict[str, np.ndarray]`` batch. Kept apart from `raydpo.data.collate` so that module (and
its tests) never import Ray.

    shard.iter_torch_batches(batch_size=8, collate_fn=DPOCollate(tokenizer.pad_token_id))
"""

from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from raydpo.data.collate import collate_dpo, collate_sft


class DPOCollate(NumpyBatchCollateFn):
    """`collate_dpo` with a fixed pad id and layout (``share_prefix``, ``pack``)."""

    def __init__(self, pad_token_id: int, share_prefix: bool = False, pack: bool = False):
        self.pad_token_id, self.share_prefix, self.pack = pad_token_id, share_prefix, pack

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate_dpo(batch, self.pad_token_id, share_prefix=self.share_prefix, pack=self.pack)


class SFTCollate(NumpyBatchCollateFn):
    """`collate_sft`: ``input_ids``/``labels``/``attention_mask`` ``[B, block_size]``."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate_sft(batch)
