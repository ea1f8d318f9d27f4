"""Preference data: sources → format (detected per source: stack-exchange, standard,
conversational, implicit prompt) → validation with counted drop reasons → prompt formatting and
chat-template rendering → train/eval split → tokenization (SFT packing, DPO pairs) in Ray Data,
plus the collate functions the training loops use.

Kept light on purpose: importing ``raydpo.data`` (or ``rows``, ``formats``, ``chat``, ``sample``,
``tokenize``, ``collate``) loads no Ray (``chat`` imports transformers when it renders); `raydpo.data.pipeline.build_datasets` and
`raydpo.data.stats.compute_stats` import it when called.
"""
