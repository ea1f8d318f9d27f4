"""Every YAML shipped in jobs/ is a valid raydpo config; the demo job is the packaged demo config."""

from pathlib import Path

import pytest

from raydpo.config import load_config
from raydpo.config.presets import demo_config, demo_config_path

REPO = Path(__file__).resolve().parents[1]
JOB_CONFIGS = sorted((REPO / "jobs").rglob("*.yaml"))


def test_job_configs_are_all_found():
    assert len(JOB_CONFIGS) == 2, JOB_CONFIGS  # update when a job config is added


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_validates(path):
    load_config(path)


def test_demo_job_is_the_packaged_demo_config():
    assert (REPO / "jobs" / "demo_cpu.yaml").read_text() == Path(demo_config_path()).read_text()


def test_gpu_recipe_follows_stack_llama_2():
    c = load_config(REPO / "jobs" / "stack_llama_2_gpu.yaml")
    assert c.model.name_or_path == "meta-llama/Llama-2-7b-hf" and c.scaling.use_gpu
    assert (c.quantization.mode, c.quantization.quant_type, c.quantization.compute_dtype) == ("4bit", "nf4", "bfloat16")
    assert (c.lora.r, c.lora.alpha, c.lora.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert (c.sft.max_steps, c.sft.per_device_batch_size, c.sft.gradient_accumulation_steps, c.sft.lr) == (500, 4, 2, 1e-4)
    assert c.data.sft_block_size == 1024
    assert (c.dpo.beta, c.dpo.lr, c.dpo.per_device_batch_size, c.dpo.gradient_accumulation_steps) == (0.1, 5e-4, 4, 4)
    assert (c.data.max_length, c.data.max_prompt_length) == (1024, 512)
    assert (c.data.sft_data_dir, c.data.dpo_data_dir) == ("data/finetune", "data/rl")


def test_demo_quick_is_shorter_and_names_are_fresh():
    full, quick = demo_config(), demo_config(quick=True)
    assert quick.dpo.max_steps < full.dpo.max_steps and quick.data.sample_size < full.data.sample_size
    assert full.run.name.startswith("demo-")
