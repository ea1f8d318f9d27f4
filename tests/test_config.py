"""Config: YAML + dotted overrides, every error reported with its path, no heavy imports."""

import math
import subprocess
import sys
import textwrap

import pytest
import yaml

from raydpo.config import Config, ConfigError, check_resources, load_config, parse_override, resume_fingerprint
from raydpo.train.deepspeed import build_ds_config, comm_backend


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_follow_stack_llama_2():
    c = Config()
    assert (c.lora.r, c.lora.alpha, c.lora.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert (c.dpo.beta, c.data.max_length, c.data.max_prompt_length) == (0.1, 1024, 512)
    assert c.data.prompt_template.format(question="Q") == "Question: Q\n\nAnswer: "


def test_yaml_then_overrides_win(tmp_path):
    p = write(tmp_path, """
        dpo: {beta: 0.3, lr: 1e-5}
        lora: {target_modules: [q_proj]}
    """)
    c = load_config(p, ["dpo.beta=0.2", "scaling.num_workers=4", "lora.target_modules=[q_proj,k_proj]"])
    assert c.dpo.beta == 0.2
    assert math.isclose(c.dpo.lr, 1e-5)  # YAML reads "1e-5" as a string; it is coerced to a number
    assert c.scaling.num_workers == 4
    assert c.lora.target_modules == ["q_proj", "k_proj"]


def test_every_error_is_reported_with_its_path(tmp_path):
    p = write(tmp_path, """
        dpo: {beta: -1, loss_type: nope, lr: fast}
        lora: {r: 0, colour: red}
        mystery: {x: 1}
        data: {max_length: 64, max_prompt_length: 128}
    """)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["scaling.num_workers=two"])
    paths = {path for path, _ in e.value.errors}
    assert {"dpo.beta", "dpo.loss_type", "dpo.lr", "lora.r", "lora.colour", "mystery",
            "scaling.num_workers", "data"} <= paths
    msgs = dict(e.value.errors)
    assert msgs["lora.colour"] == "unknown key"
    assert "max_prompt_length (128) must be < max_length (64)" in msgs["data"]


def test_zero3_needs_quant_storage_equal_to_compute_dtype():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["deepspeed.stage=3", "quantization.mode=4bit",
                           "quantization.compute_dtype=bfloat16", "quantization.quant_storage=float32"])
    assert "quant_storage" in str(e.value)
    ok = load_config(None, ["deepspeed.stage=3", "quantization.mode=4bit"])
    assert ok.quantization.quant_storage is None  # resolved to compute dtype at load time


def test_bf16_deepspeed_needs_bf16_quant_storage_for_4bit():
    # DeepSpeed bf16 casts the module; fp32-packed 4-bit weights would be silently corrupted.
    with pytest.raises(ConfigError) as e:
        load_config(None, ["deepspeed.stage=2", "quantization.mode=4bit", "scaling.use_gpu=true",
                           "quantization.compute_dtype=float32"])
    assert "quant_storage" in str(e.value) and "bf16" in str(e.value)
    # the same storage is fine when DeepSpeed trains in fp32 (the CPU demo)
    assert load_config(None, ["deepspeed.stage=2", "quantization.mode=4bit",
                              "quantization.compute_dtype=float32", "deepspeed.precision=fp32"])
    # explicit bf16 storage with fp32 compute passes the ZeRO-2 rule
    ok = load_config(None, ["deepspeed.precision=bf16", "quantization.mode=4bit",
                            "quantization.compute_dtype=float32", "quantization.quant_storage=bfloat16"])
    assert ok.quantization.quant_storage == "bfloat16"


def test_ray_data_keeps_at_least_one_whole_cpu():
    # Ray 2.60 file reads plan 1-CPU listing/sampling tasks: less than one free CPU hangs at 0 rows
    with pytest.raises(ConfigError) as e:
        load_config(None, ["scaling.data_cpus=0.5"])
    assert "scaling.data_cpus" in str(e.value)


def test_local_paths_become_absolute_for_processes_in_other_folders(tmp_path):
    # Tune trials run in their own trial folder: relative paths must not move with them
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    cfg = load_config(None, ["data.source=pairs.jsonl", "run.storage_path=runs", "model.cache_dir=.cache"])
    out = cfg.with_absolute_paths(cwd=str(tmp_path))
    assert out.data.source == str(tmp_path / "pairs.jsonl")
    assert out.run.storage_path == str(tmp_path / "runs") and out.model.cache_dir == str(tmp_path / ".cache")
    # hub ids, the builtin names and remote storage are not paths
    other = load_config(None, ["data.source=lvwerra/stack-exchange-paired", "run.storage_path=s3://bucket/runs"])
    kept = other.with_absolute_paths(cwd=str(tmp_path))
    assert kept.data.source == "lvwerra/stack-exchange-paired" and kept.run.storage_path == "s3://bucket/runs"
    assert kept.model.name_or_path == "tiny" and load_config(None, []).with_absolute_paths().data.source == "sample"


def test_override_syntax_errors():
    with pytest.raises(ConfigError):
        parse_override("dpo.beta")
    with pytest.raises(ConfigError):
        parse_override("dpo..beta=1")
    assert parse_override("tracking.run_name=") == ("tracking.run_name", "")


def test_round_trip_through_plain_data_and_flat_params():
    c = load_config(None, ["dpo.beta=0.25"])
    again = Config.from_dict(yaml.safe_load(c.to_yaml()))
    assert again == c
    flat = c.flat()
    assert flat["dpo.beta"] == 0.25 and flat["model.tiny.hidden_size"] == 64


def test_generations_defaults_errors_and_resume_freedom():
    g = Config().generations
    assert (g.enabled, g.num_prompts, g.when, g.max_new_tokens, g.do_sample) == (True, 4, "eval", 64, False)
    with pytest.raises(ConfigError) as e:  # a sampling setting with greedy decoding is not ignored silently
        Config().with_overrides({"generations.temperature": 0.7, "generations.top_k": 5})
    assert e.value.errors == [("generations", "temperature=0.7, top_k=5 only apply when sampling: set "
                               "generations.do_sample=true, or leave them at their defaults for greedy decoding")]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["generations.num_prompts=0", "generations.when=never", "generations.top_p=0"])
    assert {p for p, _ in e.value.errors} == {"generations.num_prompts", "generations.when", "generations.top_p"}
    ok = Config().with_overrides({"generations.do_sample": True, "generations.temperature": 0.7, "generations.top_p": 0.9})
    assert (ok.generations.temperature, ok.generations.top_p) == (0.7, 0.9)
    # generations change nothing a checkpoint holds: a resumed run may turn them on, off or resize them
    off = Config().with_overrides({"generations.enabled": False, "generations.num_prompts": 8})
    assert resume_fingerprint(off) == resume_fingerprint(Config())
    assert "generations.num_prompts" in Config().flat()


def test_check_resources_names_missing_paths(tmp_path):
    c = load_config(None, [f"data.source={tmp_path}/nope.jsonl", f"model.name_or_path={tmp_path}/nomodel"])
    errs = dict(check_resources(c))
    assert "no such file" in errs["data.source"] and "no such folder" in errs["model.name_or_path"]
    hub = load_config(None, ["data.source=lvwerra/stack-exchange-paired", "model.name_or_path=meta-llama/Llama-2-7b-hf"])
    assert check_resources(hub) == []


def test_ds_config_cpu_and_gpu():
    c = load_config(None, ["deepspeed.stage=3", "deepspeed.offload_optimizer=true",
                           "dpo.per_device_batch_size=4", "dpo.gradient_accumulation_steps=4"])
    cpu = build_ds_config(c, c.dpo, use_gpu=False, world_size=2)
    gpu = build_ds_config(c, c.dpo, use_gpu=True, world_size=8)
    assert cpu["train_batch_size"] == 4 * 4 * 2 and gpu["train_batch_size"] == 4 * 4 * 8
    assert not cpu["bf16"]["enabled"] and gpu["bf16"]["enabled"]
    assert cpu["zero_optimization"]["stage"] == 3
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cpu["gradient_clipping"] == c.dpo.max_grad_norm
    # the same laptop/cluster split picks the process-group backend
    assert (comm_backend(False), comm_backend(True)) == ("gloo", "nccl")


def test_validate_cli_lists_errors_and_exits_2_without_ray(tmp_path):
    p = write(tmp_path, """
        dpo: {beta: -1}
        lora: {colour: red}
        data: {source: /definitely/missing.jsonl}
    """)
    code = ("import sys; from raydpo.cli import main; rc=main(['validate','--config',sys.argv[1]]);"
            "assert 'ray' not in sys.modules, 'validate imported ray'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "dpo.beta" in r.stderr and "lora.colour: unknown key" in r.stderr
    good = write(tmp_path, "dpo: {beta: 0.2}\n", "good.yaml")
    r = subprocess.run([sys.executable, "-m", "raydpo.cli", "validate", "--config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout
    # a valid config whose data source does not exist is an error too
    r = subprocess.run([sys.executable, "-m", "raydpo.cli", "validate", "--config", str(good),
                        "--set", "data.source=./nope.parquet"], capture_output=True, text=True)
    assert r.returncode == 2 and "data.source" in r.stderr


def test_loss_type_is_one_name_or_a_weighted_list():
    one = load_config(None, ["dpo.loss_type=ipo"])
    assert one.dpo.loss_type == "ipo" and one.dpo.loss_types == ("ipo",) and one.dpo.loss_weights is None
    many = load_config(None, ["dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1.0, 0.2]"])
    assert many.dpo.loss_types == ("sigmoid", "sft") and many.dpo.loss_weights == [1.0, 0.2]
    assert Config.from_dict(yaml.safe_load(many.to_yaml())) == many  # a list stays a list (no silent rewrite)
    simpo = load_config(None, ["dpo.loss_type=[simpo, sft]", "dpo.cpo_alpha=0.1", "dpo.simpo_gamma=1.0"]).dpo
    assert (simpo.cpo_alpha, simpo.simpo_gamma) == (0.1, 1.0)
    assert load_config(None, ["dpo.loss_type=exo_pair", "dpo.label_smoothing=0.001"]).dpo.label_smoothing == 0.001
    assert load_config(None, ["dpo.loss_type=discopop", "dpo.discopop_tau=0.1"]).dpo.discopop_tau == 0.1


@pytest.mark.parametrize(("overrides", "path", "needle"), [
    (["dpo.loss_type=kto_typo"], "dpo.loss_type", "'kto_typo'; valid: sigmoid, robust"),
    (["dpo.loss_type=[sigmoid, nope]"], "dpo.loss_type", "unknown loss type 'nope'"),
    (["dpo.loss_type=[]"], "dpo.loss_type", "non-empty list"),
    (["dpo.loss_type=7"], "dpo.loss_type", "a loss name"),
    (["dpo.loss_type=sft"], "dpo.loss_type", "at least one preference loss"),
    (["dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1.0]"], "dpo.loss_weights", "1 weight(s) for 2 loss type(s)"),
    (["dpo.loss_weights=[1.0, 2.0]"], "dpo.loss_weights", "2 weight(s) for 1 loss type(s)"),
    (["dpo.loss_type=exo_pair"], "dpo.label_smoothing", "exo_pair needs label_smoothing > 0"),
    (["dpo.loss_type=hinge", "dpo.label_smoothing=0.1"], "dpo.label_smoothing", "would be ignored"),
    (["dpo.cpo_alpha=0.5"], "dpo.cpo_alpha", "simpo"),
    (["dpo.loss_type=discopop", "dpo.discopop_tau=0"], "dpo.discopop_tau", "greater than 0"),
])
def test_loss_errors_name_their_field(overrides, path, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msgs = dict(e.value.errors)
    assert path in msgs and needle in msgs[path], e.value.errors


@pytest.mark.parametrize(("loss_type", "needs"), [
    ("sigmoid", True), ("robust", True), ("hinge", True), ("ipo", True), ("bco_pair", True), ("nca_pair", True),
    ("sppo_hard", True), ("aot", True), ("aot_unpaired", True), ("apo_zero", True), ("apo_down", True),
    ("discopop", True), ("sigmoid_norm", True), ("simpo", False), ("orpo", False),
    ("[simpo, sft]", False), ("[orpo, simpo]", False), ("[sigmoid, sft]", True), ("[simpo, ipo]", True),
])
def test_needs_reference_for_each_loss(loss_type, needs):
    d = load_config(None, [f"dpo.loss_type={loss_type}"]).dpo
    assert d.needs_reference is needs
    assert d.precomputed_reference is needs  # dpo.reference defaults to precomputed
    assert load_config(None, [f"dpo.loss_type={loss_type}", "dpo.reference=adapter_disabled"]).dpo.precomputed_reference is False
    exo = load_config(None, ["dpo.loss_type=exo_pair", "dpo.label_smoothing=0.001"]).dpo
    assert exo.needs_reference


def test_a_checkpoint_made_before_a_new_setting_resumes_while_it_keeps_its_default():
    from raydpo.config import fingerprint_diff, resume_fingerprint

    old = {k: v for k, v in resume_fingerprint(Config()).items() if k != "dpo.simpo_gamma"}  # written by an older raydpo
    assert fingerprint_diff(old, resume_fingerprint(Config())) == []
    assert fingerprint_diff(old, resume_fingerprint(load_config(None, ["dpo.simpo_gamma=1.0"]))) == ["dpo.simpo_gamma"]


def test_one_resource_formula_counts_trainers_and_replicas_while_ray_data_keeps_its_cpus():
    from raydpo.orchestration.resources import count_fits, data_need, replica_need, workers_need

    def slots(s, node, unit):  # on one node, beside Ray Data's CPUs (`raydpo.orchestration.resources`)
        return count_fits([node], [data_need(s)], unit(s))

    cpu = Config().with_overrides({"scaling.num_workers": 2, "scaling.cpus_per_worker": 1.0}).scaling
    assert cpu.worker_resources() == {"CPU": 1.0} and cpu.trainer_resources() == {"CPU": 2.0}
    assert slots(cpu, {"CPU": 5.0}, workers_need) == 2  # (5 - 1 kept for Ray Data) // 2
    assert slots(cpu, {"CPU": 2.0}, workers_need) == 0  # Ray Data's CPU is never lent out
    assert slots(cpu, {"CPU": 2.0}, replica_need) == 1
    gpu = Config().with_overrides({"scaling.use_gpu": True, "scaling.num_workers": 2}).scaling
    assert gpu.trainer_resources() == {"CPU": 1.0, "GPU": 2.0}
    assert slots(gpu, {"CPU": 64.0, "GPU": 8.0}, workers_need) == 4  # the GPUs bound it
    assert slots(gpu, {"CPU": 2.0, "GPU": 8.0}, workers_need) == 1  # here the CPUs do
    assert gpu.replica_resources() == {"CPU": 0.0, "GPU": 1.0}  # a replica takes no CPU from Ray Data


def test_fp16_without_a_gpu_is_refused_up_front_not_inside_deepspeed():
    with pytest.raises(ConfigError, match="deepspeed.precision fp16 needs a GPU"):
        Config().with_overrides({"deepspeed.precision": "fp16"})
    assert Config().with_overrides({"deepspeed.precision": "fp16", "scaling.use_gpu": True,
                                    "quantization.quant_storage": "float16",
                                    "quantization.compute_dtype": "float16"}).deepspeed.precision == "fp16"
