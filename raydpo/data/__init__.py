"""Preference data: sources → validation with counted drop reasons → prompt formatting →
train/eval split → tokenization (SFT packing, DPO pairs) in Ray Data, plus the collate functions
the training loops use.

Kept light on purpose: importing ``raydpo.data`` (or ``rows``, ``sample``, ``tokenize``,
``collate``) loads no Ray; `raydpo.data.pipeline.build_datasets` and
`raydpo.data.stats.compute_stats` import it when called.
"""
