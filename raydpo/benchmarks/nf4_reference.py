"""How far today's 4-bit DPO reference is from the SFT model it stands for.

    python -m raydpo.benchmarks.nf4_reference [--runs small:40:5e-5,demo:40:5e-3,large:40:2e-2]
                                              [--workdir DIR] [--set key=value ...]

DPO after SFT merges the SFT adapter into the unquantized base and reloads the merge 4-bit
(`raydpo.orchestration.base.merged_sft_base`, `raydpo.models.factory.merge_adapter`): the
reference is NF4(W + ΔW), whereas SFT trained NF4(W) + ΔW. This measures the difference on the
held-out DPO pairs (the eval split of the generated sample), scored by the training forward
itself (`raydpo.models.pairs.pair_logps`, the collate of `raydpo.data.collate`):

* mean |Δ log-prob| per scored token, and per response (the sums DPO reads), between
  (a) the NF4 base + the SFT adapter (the SFT model as trained) and (b) NF4(merged) with a fresh
  DPO adapter disabled (the reference as DPO builds it today);
* the same with ``quantization.mode=none`` (fp32): there (a) and (b) must agree to float precision;
* DPO's step-0 metrics (beta from the config, 0.1 in the demo) with (a) as the policy and (b) as
  the reference: the rewards bias the merge puts into a DPO run whose policy starts from the SFT
  adapter on the NF4 base;
* in weight space: the LoRA update, the NF4 rounding error, how many NF4 values the merge changes and
  how far NF4(W + ΔW) is from NF4(W) + ΔW.

The SFT adapters come from real SFT runs of the demo config (4-bit NF4, tiny model, the
generated sample) through the torchrun runner (`raydpo.train.standalone`, one process: the
training loop, loading and DeepSpeed a Ray worker runs, without Ray), one per ``--runs`` entry
``name:steps:lr``: by default 40 steps each at the demo's SFT learning rate (5e-3), at a 100x
smaller one (a LoRA update below the NF4 rounding error, as a real model's usually is) and at a
4x larger one, to see how the gap scales with the update. For scale, each table also gives how
far SFT moved the model (the SFT model against the NF4 base alone). A benchmark, not a test: it
prints a table (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Scores:
    """Log-prob sums of every held-out pair's chosen responses, then of their rejected ones
    (``[2B]``), each response's scored-token count (``[2B]``) and the log-prob of every scored
    token in the same order (``[N]``)."""

    sums: torch.Tensor
    counts: torch.Tensor
    tokens: torch.Tensor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_sft(workdir: Path, name: str, steps: int, lr: float, overrides: list[str]) -> str:
    """A real SFT run of the demo config (``steps`` optimizer steps at ``lr``) through the torchrun
    runner as one process; its final adapter folder."""
    from raydpo import storage
    from raydpo.config.presets import demo_config_path

    sets = [f"run.storage_path={workdir}", f"run.name={name}", f"sft.max_steps={steps}", f"sft.lr={lr}",
            f"sft.save_every={steps}", f"sft.eval_every={10**6}", f"sft.log_every={max(1, steps // 4)}",
            *overrides]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "raydpo.train.standalone", "--config", demo_config_path(), "--stage", "sft"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"SFT run {name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    losses = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    last = [m["train/loss"] for m in losses if "train/loss" in m]
    print(f"  SFT {name}: {steps} steps at lr {lr:g} in {time.perf_counter() - t0:.0f}s, "
          f"train/loss {last[0]:.3f} -> {last[-1]:.3f}" if last else "", flush=True)
    return storage.adapter_dir(storage.standalone_step_dir(storage.standalone_dir(workdir, name, "sft"), steps))


def held_out_batches(cfg, tokenizer_path: str, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """The eval split's DPO pairs (the generated sample, the config's data settings), tokenized and
    collated as a DPO run does, in batches of ``batch_size``."""
    from raydpo.data.collate import collate_dpo, ragged
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.train.standalone import _rows, tokenize_rows

    tok = load_tokenizer(tokenizer_path)
    cols = tokenize_rows(tok, cfg, "dpo", [r for r in _rows(cfg, "dpo", tokenizer_path) if r["is_eval"]])
    keys = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    n = len(cols[keys[0]])
    return [collate_dpo({k: ragged(cols[k][lo:lo + batch_size]) for k in keys}, tok.pad_token_id,
                        share_prefix=cfg.dpo.share_prefix, pack=cfg.dpo.padding_free)
            for lo in range(0, n, batch_size)]


@contextlib.contextmanager
def captured_token_logps(into: list[torch.Tensor]):
    """Record the per-token log-probs `raydpo.models.pairs.pair_logps` computes (it calls
    ``raydpo.losses.token_logps``, the one rule for a token's log-prob), so per-token differences
    come from the very numbers whose sums DPO reads."""
    from raydpo import losses

    real = losses.token_logps

    def spy(logits, targets):
        out = real(logits, targets)
        into.append(out.detach().clone())
        return out

    losses.token_logps = spy
    try:
        yield
    finally:
        losses.token_logps = real


def score(model, batches, *, adapter: bool) -> Scores:
    """Every held-out pair scored by the training forward, adapter enabled (``adapter``) or as DPO's
    reference (`raydpo.models.pairs.reference_logps`: the adapter disabled)."""
    from raydpo.models.pairs import pair_logps, reference_logps

    parts: list[list[tuple[torch.Tensor, ...]]] = [[], []]  # per side (chosen, rejected): (sums, counts, tokens)
    for b in batches:
        got: list[torch.Tensor] = []
        with captured_token_logps(got), torch.no_grad():
            # the plain head: the fused one (equal to it, tests/test_fused_head.py) never calls token_logps
            c, r = pair_logps(model, b, fused_head=False)[:2] if adapter else reference_logps(model, b, fused_head=False)
        valid = b["score_slot"] >= 0
        slot = b["score_slot"][valid]  # side * B + pair
        tokens = got[0][valid][torch.argsort(slot, stable=True)]  # in slot order: pair by pair, side by side
        B = b["pair_lengths"].shape[0]
        counts = torch.bincount(slot, minlength=2 * B)
        n_chosen = int(counts[:B].sum())
        parts[0].append((c, counts[:B], tokens[:n_chosen]))
        parts[1].append((r, counts[B:], tokens[n_chosen:]))
    chosen, rejected = ([torch.cat(t) for t in zip(*side)] for side in parts)
    return Scores(*(torch.cat([c, r]) for c, r in zip(chosen, rejected)))


def step0_metrics(policy: Scores, reference: Scores, cfg) -> dict[str, float]:
    """DPO's step-0 metrics (the loop's loss and metric sums) with ``policy`` and ``reference``."""
    from raydpo import losses

    d = cfg.dpo
    half = policy.sums.shape[0] // 2

    def split(s: Scores):
        return s.sums[:half], s.sums[half:]

    (pc, pr), (rc, rr) = split(policy), split(reference)
    per_ex, cr, rj = losses.dpo_loss(pc, pr, rc, rr, beta=d.beta, loss_type=d.loss_types,
                                     chosen_lengths=policy.counts[:half], rejected_lengths=policy.counts[half:])
    return losses.finalize_metrics(losses.dpo_metric_sums(cr, rj, pc, pr, per_ex))


def lora_deltas(adapter_path: str) -> dict[str, torch.Tensor]:
    """``{module name in the base model: ΔW = scale · B A}`` of a LoRA adapter folder."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    w = load_file(str(Path(adapter_path) / "adapter_model.safetensors"))
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    return {k[len(prefix):-len(suffix)]: scale * (w[k.replace("lora_A", "lora_B")].float() @ a.float())
            for k, a in w.items() if k.endswith(suffix)}


def weight_gap(base_fp32, base_4bit, merged_4bit, deltas: dict[str, torch.Tensor]) -> dict[str, float]:
    """Over the 4-bit weights: the share of 4-bit codes the merge changed, the share of dequantized
    values it changed (a block's absmax scale moves all 64 of its values), and the rms of the LoRA
    update ΔW, of the base's own NF4 rounding error NF4(W) - W, and of the weights' difference
    between the reference and the SFT model, NF4(W + ΔW) - (NF4(W) + ΔW)."""
    import bitsandbytes.functional as F

    def dq(m) -> torch.Tensor:
        return F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()

    def codes(m) -> torch.Tensor:  # two 4-bit codes per byte of the packed storage
        packed = m.weight.data.contiguous().view(torch.uint8).reshape(-1)
        return torch.stack([packed >> 4, packed & 15])

    plain, merged = dict(base_fp32.named_modules()), dict(merged_4bit.named_modules())
    n = changed = codes_changed = 0
    sq = {"delta": 0.0, "nf4_err": 0.0, "gap": 0.0}
    for name, m in base_4bit.named_modules():
        if getattr(getattr(m, "weight", None), "quant_state", None) is None:
            continue
        a, b = dq(m), dq(merged[name])
        d = deltas.get(name, torch.zeros_like(a))
        n, changed = n + a.numel(), changed + int((a != b).sum())
        codes_changed += int((codes(m) != codes(merged[name])).sum())
        sq["delta"] += float((d ** 2).sum())
        sq["nf4_err"] += float(((a - plain[name].weight.detach().float()) ** 2).sum())
        sq["gap"] += float(((b - a - d) ** 2).sum())
    n = max(n, 1)
    return {"codes_changed": codes_changed / n, "values_changed": changed / n,
            **{k: (v / n) ** 0.5 for k, v in sq.items()}}


def compare(cfg, base_path: str, adapter_path: str, merged_dir: Path, batches) -> dict[str, float]:
    """(a) base + SFT adapter vs (b) the merge (into ``merged_dir``) reloaded as DPO loads it, under
    ``cfg``'s quantization."""
    from raydpo.models.factory import load_model, merge_adapter

    q = cfg.quantization
    dtype = q.compute_dtype if q.mode != "none" else cfg.model.dtype  # as merged_sft_base merges
    merged = merge_adapter(base_path, adapter_path, str(merged_dir), dtype)
    sft = load_model(cfg.model, q, cfg.lora, base_path=base_path, adapter_path=adapter_path, trainable=False).eval()
    torch.manual_seed(cfg.dpo.seed)
    ref = load_model(cfg.model, q, cfg.lora, base_path=merged).eval()  # a fresh DPO adapter, as a DPO worker
    a, b = score(sft, batches, adapter=True), score(ref, batches, adapter=False)
    base = score(sft, batches, adapter=False)  # the SFT adapter disabled: the (NF4) base alone
    out = {"tok_abs": float((a.tokens - b.tokens).abs().mean()), "tok_max": float((a.tokens - b.tokens).abs().max()),
           "sum_abs": float((a.sums - b.sums).abs().mean()), "tokens": int(a.tokens.numel()),
           "pairs": a.sums.shape[0] // 2, "tok_logp": float(a.tokens.mean()),
           "sft_shift": float((a.tokens - base.tokens).abs().mean())}
    out.update({f"step0 {k}": v for k, v in step0_metrics(a, b, cfg).items()})
    if q.mode == "4bit":
        from raydpo.models.factory import load_base

        plain = load_base(cfg.model, cfg.quantization.model_copy(update={"mode": "none"}), base_path=base_path)
        out.update(weight_gap(plain, load_base(cfg.model, q, base_path=base_path), ref.base_model.model,
                              lora_deltas(adapter_path)))
    return out


def report(name: str, steps: int, lr: float, rows: dict[str, dict[str, float]]) -> None:
    """One adapter's table: (a) vs (b) under NF4 and in fp32."""
    nf4, fp32 = rows["4bit"], rows["none"]
    print(f"\nSFT adapter '{name}': {steps} steps, lr {lr:g}; "
          f"{nf4['pairs']} held-out pairs, {nf4['tokens']} scored tokens (mean log-prob {nf4['tok_logp']:.3f})")
    print(f"  {'':<32} {'NF4 (4-bit)':>12} {'fp32 control':>13}")
    for key, label in (("sft_shift", "SFT's shift from the base /token"), ("tok_abs", "mean |Δ log-prob| per token"),
                       ("tok_max", "max |Δ log-prob| per token"),
                       ("sum_abs", "mean |Δ log-prob| per response"),
                       ("step0 rewards/chosen", "step-0 rewards/chosen"),
                       ("step0 rewards/rejected", "step-0 rewards/rejected"),
                       ("step0 rewards/margins", "step-0 rewards/margins"),
                       ("step0 rewards/accuracies", "step-0 rewards/accuracies"), ("step0 loss", "step-0 loss")):
        print(f"  {label:<32} {nf4[key]:>12.3e} {fp32[key]:>13.3e}")
    print(f"  4-bit weights: rms LoRA update ΔW {nf4['delta']:.2e}, rms NF4 rounding error of the base "
          f"{nf4['nf4_err']:.2e}; the merge changed {nf4['codes_changed']:.1%} of the NF4 codes "
          f"({nf4['values_changed']:.1%} of the values: block scales move); rms weight gap "
          f"NF4(W+ΔW) - (NF4(W)+ΔW) {nf4['gap']:.2e} ({nf4['gap'] / max(nf4['delta'], 1e-30):.2f} x ΔW)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="small:40:5e-5,demo:40:5e-3,large:40:2e-2",
                   help="SFT runs as name:steps:lr, comma-separated")
    p.add_argument("--workdir", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    from raydpo.config.presets import demo_config
    from raydpo.models.factory import resolve_model_path

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raydpo-nf4ref-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(overrides=[f"run.storage_path={workdir}", *args.overrides])
    base = resolve_model_path(cfg.model)
    batches = held_out_batches(cfg, base)
    print(f"workdir {workdir}; base {base}", flush=True)
    for run in args.runs.split(","):
        name, steps, lr = run.split(":")
        steps, lr = int(steps), float(lr)
        adapter = train_sft(workdir, name, steps, lr, args.overrides)
        rows = {mode: compare(cfg.with_overrides({"quantization.mode": mode}), base, adapter,
                              workdir / f"merged-{name}-{mode}", batches) for mode in ("4bit", "none")}
        report(name, steps, lr, rows)


if __name__ == "__main__":
    main()
