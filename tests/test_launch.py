"""Scale-out: generated accelerate/DeepSpeed/FSDP2 configs, refused combinations, and real multi-process CPU runs
of `tunekit sft` through `accelerate launch` (gloo), DeepSpeed ZeRO-2/3 (DS_ACCELERATOR=cpu) and FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import QA, ROOT, run_cli, write_jsonl
from tunekit.launch.accelerate import LaunchOptions, accelerate_config, deepspeed_config


def test_deepspeed_json_per_strategy():
    z2 = deepspeed_config("zero2")["zero_optimization"]
    assert z2["stage"] == 2 and "offload_optimizer" not in z2 and z2["reduce_bucket_size"] == 50_000_000
    z3 = deepspeed_config("zero3")["zero_optimization"]
    assert z3["stage"] == 3 and z3["stage3_gather_16bit_weights_on_model_save"] is True
    off = deepspeed_config("zero3_offload")["zero_optimization"]
    assert off["offload_optimizer"]["device"] == "cpu" and off["offload_param"]["device"] == "cpu"
    assert deepspeed_config("zero1")["train_micro_batch_size_per_gpu"] == "auto"  # filled in by transformers


def test_accelerate_config_for_multi_node_and_fsdp2(tmp_path):
    opts = LaunchOptions(gpus=8, nodes=2, main_address="10.0.0.1", main_port=29600, machine_rank=1)
    cfg = accelerate_config(opts, "ddp", "bf16", None)
    assert cfg["num_processes"] == 16 and cfg["num_machines"] == 2 and cfg["machine_rank"] == 1
    assert cfg["main_process_ip"] == "10.0.0.1" and cfg["main_process_port"] == 29600
    assert cfg["distributed_type"] == "MULTI_GPU"
    fsdp = accelerate_config(opts, "fsdp2", "bf16", None, checkpointing=True)
    assert fsdp["distributed_type"] == "FSDP"
    assert fsdp["fsdp_config"]["fsdp_version"] == 2 and fsdp["fsdp_config"]["fsdp_cpu_ram_efficient_loading"]
    ds = accelerate_config(opts, "zero3", "bf16", tmp_path / "ds.json")
    assert ds["distributed_type"] == "DEEPSPEED" and ds["deepspeed_config"]["zero3_init_flag"] is True


def test_zero3_with_4bit_base_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    res = run_cli("sft", "--strategy", "zero3", "--gpus", "2", "--set", f"model.name={tiny_model_dir}",
                  "--set", "model.load_in_4bit=true", "-o", out)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: --strategy zero3: DeepSpeed ZeRO-3 cannot partition")
    assert "fsdp2" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
    res = run_cli("sft", "--nodes", "2", "--set", f"model.name={tiny_model_dir}", "-o", out)
    assert res.returncode == 2 and "--main-address" in res.stderr


@pytest.fixture(scope="module")
def four_records(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data4") / "qa.jsonl", QA[:4])


def _sft(model_dir, data, out, *flags, batch=4):
    """One plain-SGD step over all four records: the update is linear in the summed gradient, so any split of
    the four records over processes gives the same adapter; a split that dropped or repeated records would not."""
    env = {"OMP_NUM_THREADS": "1"}
    args = ["sft", *flags, "--set", f"model.name={model_dir}", "--set", f"data.train={data}",
            "--set", "data.eval_split=0", "--set", "train.max_steps=1", "--set", f"train.batch_size={batch}",
            "--set", "train.optim=sgd", "--set", "train.lr=0.5", "--set", "train.warmup_ratio=0",
            "--set", "train.lr_scheduler=constant", "--set", "train.save_steps=0", "--set", "generate.samples=0",
            "--set", "adapter.dropout=0", "-o", out]
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        res = run_cli(*args, timeout=900)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _adapter(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_model_dir, four_records):
    out = tmp_path_factory.mktemp("single") / "run"
    _sft(tiny_model_dir, four_records, out)
    return out


@pytest.mark.slow
def test_two_processes_split_the_data_and_match_one_process(tmp_path, tiny_model_dir, four_records, single_run):
    """accelerate launch --multi_gpu --num_processes 2 on CPU = a real 2-process gloo DDP run."""
    out = tmp_path / "run"
    res = _sft(tiny_model_dir, four_records, out, "--gpus", "2", batch=2)
    command = next(line for line in res.stderr.splitlines() if line.startswith("launch (ddp, 2 processes)"))
    assert f"accelerate launch --config_file {out}.launch/accelerate.yaml -m tunekit sft" in command
    assert "num_processes: 2" in (tmp_path / "run.launch" / "accelerate.yaml").read_text()
    card = json.loads((out / "run_card.json").read_text())
    assert card["world_size"] == 2 and card["global_step"] == 1 and card["finished"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m]) == 1  # rank 0 alone wrote the run directory
    two, one = _adapter(out), _adapter(single_run)
    assert max(t.abs().max() for t in two.values()) > 1e-3  # the step moved lora_B off zero
    _assert_same_adapter(two, one)  # each rank saw a disjoint half: together the same gradient as all four
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, out / "adapter")  # reloads in plain PEFT


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_zero_through_the_same_path(tmp_path, tiny_model_dir, four_records, single_run, strategy):
    """DeepSpeed ZeRO on CPU (DS_ACCELERATOR=cpu). One process: accelerate's DeepSpeed launcher on a machine
    without GPUs starts a single rank, so partitioning is over one rank here; the code path (generated JSON,
    Trainer + DeepSpeed engine, ZeRO-3 gather for saving) is the one multi-GPU runs take."""
    out = tmp_path / "run"
    res = _sft(tiny_model_dir, four_records, out, "--strategy", strategy)
    assert f"launch ({strategy}, 1 process)" in res.stderr
    ds = json.loads((tmp_path / "run.launch" / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == int(strategy[-1])
    _assert_same_adapter(_adapter(out), _adapter(single_run))


FSDP2_SCRIPT = textwrap.dedent('''
    import json, sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    from tunekit.launch.plan import shape_of
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    shape = shape_of(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    ids = torch.arange(16).view(2, 8)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = sum(p.grad.to_local().numel() for p in model.parameters() if p.grad is not None)
    sizes = [None, None]
    dist.all_gather_object(sizes, local)
    if rank == 0:
        print(json.dumps({"local": sizes, "total": shape.total_params, "grads": grads, "loss": loss.item()}))
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_fsdp2_shards_a_tiny_model_over_two_cpu_processes(tmp_path, tiny_model_dir):
    """accelerate's FSDP plugin needs GPUs, so this drives torch's own FSDP2 `fully_shard` (what it wraps)."""
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", str(script), str(tiny_model_dir)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # each rank holds half of every parameter (dim-0 shards): the planner's 1/P
    assert sum(out["local"]) == out["total"] and abs(out["local"][0] - out["local"][1]) <= out["total"] * 0.01
    assert out["grads"] == out["local"][0]  # gradients are sharded too
    assert out["loss"] > 0


@pytest.mark.slow
def test_dpo_on_two_processes_matches_one(tmp_path, tiny_model_dir):
    """`tunekit dpo --gpus 2`: the DPO loss is a mean over pairs, DDP averages two equal halves, so one SGD step
    over all eight pairs gives the same adapter on 2 processes x 4 pairs as on 1 process x 8 pairs."""
    pairs = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + 1} maybe"}
             for a in range(1, 3) for b in range(1, 5)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)

    def dpo(out, *flags, batch):
        sets = [f"model.name={tiny_model_dir}", f"data.train={data}", "data.eval_split=0", "train.max_steps=1",
                f"train.batch_size={batch}", "train.optim=sgd", "train.lr=0.5", "train.warmup_ratio=0",
                "train.lr_scheduler=constant", "train.save_steps=0", "generate.samples=0", "adapter.dropout=0"]
        res = run_cli("dpo", *flags, *[a for s in sets for a in ("--set", s)], "-o", out, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        return _adapter(out)

    two = dpo(tmp_path / "two", "--gpus", "2", batch=4)
    assert json.loads((tmp_path / "two" / "run_card.json").read_text())["world_size"] == 2
    one = dpo(tmp_path / "one", batch=8)
    assert max(t.abs().max() for t in two.values()) > 1e-4
    _assert_same_adapter(two, one)


def _only_an_error_line(res, tmp_path):
    """The single-process contract under --gpus 2: exit 2, one `error:` line, no traceback, nothing left."""
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr[-3000:]
    assert not list(tmp_path.glob("run*")), list(tmp_path.iterdir())  # no run, .partial or .launch/
    return errors[0]


@pytest.mark.parametrize("case, message", [
    ("malformed-line", "bad.jsonl:2"),
    ("missing-file", "nope.jsonl"),
    ("unknown-key", "train.lrr"),
])
def test_bad_input_with_gpus_2_fails_before_any_worker(tmp_path, tiny_model_dir, four_records, case, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QA[0]) + "\n{not json\n")
    data = {"malformed-line": bad, "missing-file": tmp_path / "nope.jsonl", "unknown-key": four_records}[case]
    sets = [f"model.name={tiny_model_dir}", f"data.train={data}", "train.max_steps=1", "generate.samples=0",
            *(["train.lrr=1e-4"] if case == "unknown-key" else [])]
    res = run_cli("sft", "--gpus", "2", *[a for s in sets for a in ("--set", s)], "-o", tmp_path / "run")
    line = _only_an_error_line(res, tmp_path)
    assert message in line and "launch (" not in res.stderr  # no worker was started


@pytest.mark.slow  # starts two workers (~20-40 s on an idle 2-core machine)
def test_an_error_the_workers_meet_is_printed_once(tmp_path, tiny_model_dir, four_records):
    """Weights that are truncated are found only when the workers load the model: the launching process prints
    the workers' error once, exits 2, and removes the launch folder."""
    import shutil

    broken = tmp_path / "model_trunc"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    sets = [f"model.name={broken}", f"data.train={four_records}", "train.max_steps=1", "generate.samples=0"]
    res = run_cli("sft", "--gpus", "2", *[a for s in sets for a in ("--set", s)], "-o", tmp_path / "run",
                  timeout=900)
    assert "launch (ddp, 2 processes)" in res.stderr, res.stderr[-3000:]
    line = _only_an_error_line(res, tmp_path)
    assert "corrupt or truncated safetensors" in line, line  # the line one process prints
