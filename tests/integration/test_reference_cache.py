"""The default-on reference cache never hands a run stale log-probs: a new SFT adapter under the
same run name gets fresh ones, and a damaged cache is rebuilt. (An empty eval split:
test_submit.py's job trains on one.)"""

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *extra):
    from raydpo.config.presets import demo_config

    return demo_config(quick=True, overrides=[
        f"run.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"model.cache_dir={REPO / '.raydpo_cache'}", "data.sample_size=64", "run.name=cache", *extra])


def _sft_adapter(cfg, base_path, out, seed):
    """Stands in for an SFT run writing its adapter to the run's (fixed) path."""
    from raydpo.models.factory import load_model
    from raydpo.data.tokenizer import load_tokenizer

    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=base_path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    load_tokenizer(base_path).save_pretrained(out)


def _ref(ds):
    return ds.to_pandas().sort_values("ref_chosen_logps")["ref_chosen_logps"].to_numpy()


@pytest.mark.timeout(600)
def test_a_new_sft_adapter_under_the_same_run_name_gets_fresh_reference_logps(tmp_path, ray_connected):
    from raydpo.orchestration.base import merged_sft_base, resolve_base
    from raydpo.orchestration.reference import reference_datasets

    cfg = _cfg(tmp_path).with_absolute_paths()
    base_path, _ = resolve_base(cfg)
    adapter = tmp_path / "runs" / "cache" / "sft-adapter"
    said: list[str] = []
    _sft_adapter(cfg, base_path, adapter, seed=1)
    merged = merged_sft_base(cfg, str(adapter), base_path)
    first = _ref(reference_datasets(cfg, merged, merged, progress=said.append)[0])
    again = _ref(reference_datasets(cfg, merged, merged, progress=said.append)[0])
    assert any("reusing" in s for s in said) and (first == again).all()  # same content: cached
    # a small cached split is read on the driver; Ray Data's parquet read gives the same rows
    from raydpo.data.order import ROW_ID
    from raydpo.orchestration.reference import cache_key, read_split

    folder = tmp_path / "runs" / "reference" / cache_key(cfg, merged, merged)[0] / "train"  # (eval: empty here)
    local, tasks = (read_split(folder, 0.25, limit).to_pandas().sort_values(ROW_ID).reset_index(drop=True)
                    for limit in (None, 0))
    assert len(local) > 0 and list(local.columns) == list(tasks.columns)
    for col in local.columns:
        assert local[col].map(repr).tolist() == tasks[col].map(repr).tolist(), col

    _sft_adapter(cfg, base_path, adapter, seed=2)  # the SFT stage ran again: same path, new weights
    merged2 = merged_sft_base(cfg, str(adapter), base_path)
    assert merged2 == merged  # same folder, re-merged
    said.clear()
    second = _ref(reference_datasets(cfg, merged2, merged2, progress=said.append)[0])
    assert any("computing" in s for s in said)
    assert len(second) == len(first) and abs(second - first).max() > 1e-2  # fresh log-probs, not the old ones
    caches = [p for p in (tmp_path / "runs" / "reference").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(caches) == 2

    # a damaged cache (a lost part file) is rebuilt, not trusted
    victim = tmp_path / "runs" / "reference" / cache_key(cfg, merged2, merged2)[0]
    next((victim / "train").glob("*.parquet")).unlink()
    said.clear()
    rebuilt = _ref(reference_datasets(cfg, merged2, merged2, progress=said.append)[0])
    assert any("rebuilding" in s for s in said)
    assert len(rebuilt) == len(second) and abs(rebuilt - second).max() < 1e-4
