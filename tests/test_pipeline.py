"""`tunekit run PIPELINE.yaml` on a tiny model: five stages run; a second run is all cached; a changed key re-runs
exactly its stage and dependants (upstream outputs untouched); an in-place data edit re-runs from its first
reader; altered or removed outputs re-run; a kill then --resume equals an uninterrupted run; every stage is
validated before the first writes; cycles and unknown names are one-line errors; a second writer is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import QA, ROOT, run_cli, write_jsonl
from tunekit.errors import TunekitError
from tunekit.pipeline.run import run_file

PAIRS = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": "I do not know."} for r in QA]

ALL = ("sft", "dpo", "merged", "gguf", "report")
TRAIN = "{max_steps: 2, batch_size: 2, lr: 1.0e-2, save_steps: 0, logging_steps: 1}"


def _pipeline(folder: Path, model: Path, dpo_beta: float = 0.1, extra: str = "") -> Path:
    """sft -> dpo -> merged -> gguf -> report, with data next to the pipeline file (relative paths)."""
    if not (folder / "qa.jsonl").exists():
        write_jsonl(folder / "qa.jsonl", QA)
        write_jsonl(folder / "pairs.jsonl", PAIRS)
    text = f"""\
output: {folder / 'out'}
defaults:
  model: {{name: {model}}}
  data: {{max_length: 64}}
  adapter: {{method: lora, r: 4}}
  generate: {{samples: 0}}
stages:
  sft:
    command: sft
    data: {{train: qa.jsonl, eval_split: 2}}
    train: {TRAIN}
  dpo:
    command: dpo
    from: sft
    data: {{train: pairs.jsonl, eval_split: 2}}
    train: {TRAIN}
    set: {{dpo.beta: {dpo_beta}}}
  merged: {{command: merge, from: dpo}}
  gguf: {{command: quantize, from: merged, format: gguf, type: Q8_0, verify: true}}
  report:
    command: eval
    targets: [sft, merged]
    data: qa.jsonl
    limit: 2
    generate: false
{extra}"""
    path = folder / "pipeline.yaml"
    path.write_text(text)
    return path


def _mtimes(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _plan(path: Path) -> dict[str, tuple[str, str]]:
    from tunekit.pipeline.plan import make_plan
    from tunekit.pipeline.resolve import resolve_pipeline
    from tunekit.pipeline.spec import read_pipeline

    spec = read_pipeline(path)
    return {p.name: (p.action, p.why) for p in make_plan(spec, resolve_pipeline(spec))}


def _text(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def _statuses(out: Path) -> dict[str, str]:
    return {n: e["status"] for n, e in json.loads((out / "pipeline.json").read_text())["stages"].items()}


@pytest.fixture(scope="module")
def ran(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    path = _pipeline(folder, tiny_model_dir)
    run_file(path)
    return folder, path


@pytest.mark.slow
def test_five_stages_run_then_all_cached(ran, capsys):
    folder, path = ran
    out = folder / "out"
    assert _statuses(out) == dict.fromkeys(ALL, "ran")
    assert (out / "sft/adapter").is_dir() and (out / "dpo/adapter").is_dir()
    assert (out / "merged/config.json").is_file() and (out / "gguf/model-Q8_0.gguf").is_file()
    evals = json.loads((out / "report/eval.json").read_text())["targets"]
    assert set(evals) == {"sft", "merged"} and all("perplexity" in json.dumps(v) for v in evals.values())
    record = json.loads((out / "pipeline.json").read_text())
    assert record["stages"]["dpo"]["chained_from"]  # the sft adapter the dpo model stands on
    report = (out / "report.md").read_text()
    assert "| sft | sft | ran |" in report and "loss.png" in report and "## report: eval results" in report
    assert "| gguf | quantize | ran |" in report and "ppl_change_pct" in report
    before = _mtimes(out / "sft")
    started = time.perf_counter()
    run_file(path)
    seconds = time.perf_counter() - started
    assert _statuses(out) == dict.fromkeys(ALL, "cached")
    assert seconds < 5, seconds
    assert _mtimes(out / "sft") == before
    assert "cached" in _text(capsys)


@pytest.mark.slow
def test_changed_key_reruns_stage_and_dependants_only(ran, tiny_model_dir, capsys):
    folder, _ = ran
    out = folder / "out"
    sft_before = _mtimes(out / "sft")
    path = _pipeline(folder, tiny_model_dir, dpo_beta=0.2)
    run_file(path, dry_run=True)
    assert "will run" in _text(capsys)
    plan = _plan(path)
    assert plan["sft"] == ("cached", "up to date") and plan["dpo"] == ("run", "changed: dpo.beta")
    assert plan["merged"] == ("run", "upstream 'dpo' re-runs")
    run_file(path)
    assert _statuses(out) == {"sft": "cached", "dpo": "ran", "merged": "ran", "gguf": "ran", "report": "ran"}
    assert _mtimes(out / "sft") == sft_before  # byte-identical, not rewritten (same mtimes)
    # an in-place edit of the sft data re-runs from sft on
    with (folder / "qa.jsonl").open("a") as fh:
        fh.write(json.dumps({"instruction": "One more?", "output": "Yes."}) + "\n")
    assert _plan(path)["sft"] == ("run", f"input changed: {folder / 'qa.jsonl'}")
    run_file(path)
    assert _statuses(out) == dict.fromkeys(ALL, "ran")
    # an altered output re-runs its stage (and dependants); a removed one too
    (out / "merged/config.json").write_text((out / "merged/config.json").read_text() + " ")
    run_file(path)
    assert _statuses(out) == {"sft": "cached", "dpo": "cached", "merged": "ran", "gguf": "ran", "report": "ran"}
    import shutil

    shutil.rmtree(out / "report")
    run_file(path)
    assert _statuses(out)["report"] == "ran" and _statuses(out)["merged"] == "cached"
    run_file(path, force=["dpo"], until="merged")
    assert _statuses(out) == {"sft": "cached", "dpo": "ran", "merged": "ran", "gguf": "skip", "report": "skip"}


def test_typo_in_last_stage_fails_before_anything_is_written(tiny_model_dir, tmp_path):
    path = _pipeline(tmp_path, tiny_model_dir)
    text = path.read_text().replace("    limit: 2\n", "    limitt: 2\n")
    path.write_text(text)
    line = text.splitlines().index("  report:") + 1
    proc = run_cli("run", path, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err == [f"error: {path}:{text.splitlines().index('    limitt: 2') + 1}: stage 'report': unknown key "
                   "'limitt' (did you mean 'limit'?); eval takes: targets, data, base, limit, max_length, "
                   "max_new_tokens, batch_size, generate, reward, tasks, num_fewshot, apply_chat_template, "
                   "against, judge, judge_template, trust_remote_code"], err
    assert line > 0 and not (tmp_path / "out").exists()
    # a bad recipe key deep in a training stage: named with its line too
    path.write_text(_pipeline(tmp_path, tiny_model_dir).read_text().replace("lr: 1.0e-2", "lr: -1", 1))
    proc = run_cli("run", path, cwd=tmp_path)
    assert proc.returncode == 2 and "stage 'sft'" in proc.stderr and "train.lr" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    (("from: sft", "from: sfft"), "stage 'dpo': unknown stage 'sfft' (did you mean 'sft'?)"),
    (("merged: {command: merge, from: dpo}", "merged: {command: merge, from: report}"), "a cycle: "),
    (("  merged: {command: merge, from: dpo}", "  merged: {command: quantize, from: report}"), "a cycle"),
    (("merged: {command: merge, from: dpo}", "merged: {command: quantize, from: report2}"), "unknown stage"),
    (("    targets: [sft, merged]", "    targets: [sft, mergd]"), "'mergd' is neither a stage"),
    (("command: dpo", "command: dpoo"), "unknown command 'dpoo' (did you mean 'dpo'?)"),
    (("    generate: false", "    reward: math_answr"), "reward: unknown reward 'math_answr'"),
    (("    data: qa.jsonl", "    data: missing.jsonl"), "data: 'missing.jsonl' not found"),
    (("data: {train: pairs.jsonl,", "data: {train: nothere.jsonl,"), "data file"),
])
def test_graph_errors_are_one_line_with_file_and_line(tiny_model_dir, tmp_path, edit, message):
    from tunekit.pipeline.resolve import resolve_pipeline
    from tunekit.pipeline.spec import read_pipeline

    path = _pipeline(tmp_path, tiny_model_dir)
    path.write_text(path.read_text().replace(*edit))
    with pytest.raises(TunekitError) as info:
        resolve_pipeline(read_pipeline(path))
    text = str(info.value)
    assert message in text and text.startswith(f"{path}:") and "\n" not in text, text
    assert text.split(":")[1].isdigit()


def test_wrong_kind_of_upstream_is_refused(tiny_model_dir, tmp_path):
    from tunekit.pipeline.resolve import resolve_pipeline
    from tunekit.pipeline.spec import read_pipeline

    path = _pipeline(tmp_path, tiny_model_dir, extra=f"""\
  rm: {{command: rm, data: {{train: pairs.jsonl, eval_split: 2}}, train: {TRAIN}}}
  gguf: {{command: quantize, from: rm, format: gguf, type: Q8_0}}
""")
    with pytest.raises(TunekitError, match="stage 'gguf': from: 'rm' is a rm stage"):
        resolve_pipeline(read_pipeline(path))


def _popen(path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tunekit", "run", str(path), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_kill_then_resume_equals_uninterrupted_and_second_writer_refused(tiny_model_dir, tmp_path, kill):
    from safetensors.torch import load_file

    from tunekit.run import guard

    long_train = "{max_steps: 12, batch_size: 2, lr: 1.0e-2, save_steps: 2, logging_steps: 1}"
    runs = {}
    for which in ("killed", "straight"):
        folder = tmp_path / which
        folder.mkdir()
        path = _pipeline(folder, tiny_model_dir)
        path.write_text(path.read_text().replace(TRAIN, long_train, 1))
        runs[which] = path
    proc = _popen(runs["killed"])
    partial = tmp_path / "killed/out/sft.partial/checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(partial.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(kill)  # in the middle of the sft stage
    code = proc.wait()
    assert not (tmp_path / "killed/out/sft").exists()
    if kill == signal.SIGTERM:  # a scheduler's stop: as Ctrl-C, recorded as interrupted
        assert code == 130 and _statuses(tmp_path / "killed/out")["sft"] == "interrupted", proc.stderr.read()
    with pytest.raises(TunekitError, match="stage 'sft' was interrupted.*--resume"):
        run_file(runs["killed"])
    resumed = _popen(runs["killed"], "--resume")
    lock = guard.lock_file_for(tmp_path / "killed/out")
    while time.time() < deadline and not lock.exists():
        assert resumed.poll() is None, resumed.stderr.read()
        time.sleep(0.1)
    with pytest.raises(TunekitError, match="is being written by pid"):  # a second writer is refused
        run_file(runs["killed"], resume=True)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert "resuming from checkpoint-" in resumed.stderr.read()
    run_file(runs["straight"])
    for stage in ("sft", "dpo"):
        a = load_file(tmp_path / f"killed/out/{stage}/adapter/adapter_model.safetensors")
        b = load_file(tmp_path / f"straight/out/{stage}/adapter/adapter_model.safetensors")
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a), stage


def test_shipped_pipelines_and_recipes_validate_from_another_folder(tmp_path):
    """From any working directory: paths resolve against the file, tunekit/assets against the package."""
    code = ("from tunekit.pipeline.spec import read_pipeline; from tunekit.pipeline.resolve import "
            "resolve_pipeline; import sys; [resolve_pipeline(read_pipeline(p)) for p in sys.argv[1:]]; "
            "from tunekit.cli.stage import resolve_recipe; r = resolve_recipe('sft', 'sft-lora-demo', [], None); "
            "from pathlib import Path; assert Path(r.data.train).is_file(), r.data.train; print('ok')")
    files = [ROOT / f"recipes/pipelines/{n}.yaml" for n in ("assistant-demo", "rlhf-demo", "cai-demo")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, files)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_recipe_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    from tunekit.config.load import load_recipe
    from tunekit.paths import assets_dir

    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub/qa.jsonl", QA)
    recipe = tmp_path / "sub/recipe.yaml"
    recipe.write_text("data: {train: qa.jsonl, eval: tunekit/assets/demo/eval.jsonl}\nmodel: {name: Org/model}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(recipe)
    assert Path(cfg.data.train) == tmp_path / "sub/qa.jsonl"
    monkeypatch.chdir(tmp_path / "sub")  # where `qa.jsonl` also exists as written: the same one absolute path
    assert load_recipe(recipe).data.train == cfg.data.train
    assert Path(cfg.data.eval) == assets_dir() / "demo/eval.jsonl" and Path(cfg.data.eval).is_file()
    assert cfg.model.name == "Org/model"  # a hub id is never taken for a path


@pytest.mark.slow
def test_wheel_holds_recipes_and_assets(tmp_path):
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("tunekit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "tunekit/assets/demo/train.jsonl" in names
    assert "tunekit/recipes/sft-lora-demo.yaml" in names
    assert "tunekit/recipes/pipelines/assistant-demo.yaml" in names


# ---- eval stages with every `tunekit eval` mode: tasks, a judge's win rate, a baseline ----
def _eval_pipeline(folder: Path, model: Path, tasks: str = "tunekit_pref", extra: str = "") -> Path:
    """sft -> three eval stages: lm_eval tasks on the sft run; the tiny model judged against the sft run by
    the sft run; perplexity of the sft run beside its base model."""
    if not (folder / "qa.jsonl").exists():
        write_jsonl(folder / "qa.jsonl", QA)
    text = f"""\
output: {folder / 'out'}
defaults:
  model: {{name: {model}}}
  data: {{max_length: 64}}
  adapter: {{method: lora, r: 4}}
  generate: {{samples: 0}}
stages:
  sft:
    command: sft
    data: {{train: qa.jsonl, eval_split: 2}}
    train: {TRAIN}
  bench:
    command: eval
    targets: [sft]
    tasks: {tasks}
    limit: 2
    batch_size: 2
  judged:
    command: eval
    targets: [{model}]
    against: sft
    judge: sft
    judge_template: helpful
    data: qa.jsonl
    limit: 3
    max_new_tokens: 4
  compared:
    command: eval
    targets: [sft]
    against: {model}
    data: qa.jsonl
    limit: 2
    generate: false
{extra}"""
    path = folder / "pipeline.yaml"
    path.write_text(text)
    return path


def test_eval_stage_runs_tasks_judge_and_baseline_through_tunekit_eval(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    path = _eval_pipeline(tmp_path, tiny_model_dir)
    run_file(path)
    out = tmp_path / "out"
    assert _statuses(out) == dict.fromkeys(("sft", "bench", "judged", "compared"), "ran")
    record = json.loads((out / "pipeline.json").read_text())
    assert record["stages"]["judged"]["needs"] == ["sft"]  # against: and judge: name the sft stage
    bench = json.loads((out / "bench/eval.json").read_text())
    assert bench["tasks"] == ["tunekit_pref"] and "data" not in bench
    acc = bench["targets"]["sft"]["metrics"]["tunekit_pref/acc"]["value"]
    assert bench["targets"]["sft"]["mode"] == "tasks" and 0 <= acc <= 1
    assert json.loads((out / "bench/sft.json").read_text())["details"]  # per-item samples, as `tunekit eval -o`
    judged = json.loads((out / "judged/eval.json").read_text())
    assert judged["against"] == "sft" and judged["judge"] == "sft"
    (result,) = judged["targets"].values()
    assert result["mode"] == "judge" and result["baseline"] == str(out / "sft") and result["n"] == 3
    win_rate = result["metrics"]["win_rate"]["value"]
    assert 0 <= win_rate <= 1 and result["settings"]["judge"] == str(out / "sft")
    assert len((next((out / "judged").glob("*.judgements.jsonl"))).read_text().splitlines()) == 3
    compared = json.loads((out / "compared/eval.json").read_text())
    ppl = compared["targets"]["sft"]["metrics"]["perplexity"]
    assert compared["data"] == str(tmp_path / "qa.jsonl") and "difference" in ppl
    report = (out / "report.md").read_text()
    assert "## bench: eval results" in report and f"| tunekit_pref/acc | {acc:.4g} |" in report
    assert f"| win_rate | {win_rate:.4g} |" in report and "judged by `sft`" in report
    assert f"| perplexity | {ppl['value']:.4g} | {ppl['baseline']['value']:.4g} |" in report
    assert f"| metric | sft | {tiny_model_dir} (baseline) |" in report
    # unchanged: all cached; a changed `tasks:` re-runs that eval stage alone
    assert {n: a for n, (a, _) in _plan(path).items()} == dict.fromkeys(record["stages"], "cached")
    sft_before = _mtimes(out / "sft")
    path = _eval_pipeline(tmp_path, tiny_model_dir, tasks="[tunekit_pref, tunekit_demo]")
    assert _plan(path)["bench"] == ("run", "changed: tasks")
    run_file(path)
    assert _statuses(out) == {"sft": "cached", "bench": "ran", "judged": "cached", "compared": "cached"}
    assert _mtimes(out / "sft") == sft_before
    metrics = json.loads((out / "bench/eval.json").read_text())["targets"]["sft"]["metrics"]
    assert "tunekit_demo/exact_match" in metrics and "tunekit_demo/exact_match" in (out / "report.md").read_text()


@pytest.mark.parametrize("edit, message, key", [
    (("    tasks: tunekit_pref", "    tasks: tunekit_prf"), "tasks: unknown task 'tunekit_prf'", "tasks"),
    (("    tasks: tunekit_pref", "    taskss: tunekit_pref"), "unknown key 'taskss' (did you mean 'tasks'?)",
     "taskss"),
    (("    batch_size: 2", "    batch_size: 2\n    data: qa.jsonl"), "data: no effect with `tasks:`", "data"),
    (("    against: sft\n", ""), "judge: needs `against:`", "judge"),
    (("    batch_size: 2", "    batch_size: 2\n    judge: sft"), "judge: no effect with `tasks:`", "judge"),
    (("    tasks: tunekit_pref", "    tasks: [tunekit_pref, 3]"), "tasks: task names", "tasks"),
    (("    generate: false", "    reward: 7"), "reward: a reward name or a list", "reward"),
    (("    generate: false", "    reward: length"), "give `min`, `max` or both", "reward"),
    (("    judge: sft", "    judge: sfft"), "judge: 'sfft' is neither a stage, a path nor a model alias (did you "
     "mean 'sft'?)", "judge"),
    (("    judge: sft", "    judge: bench"), "judge: 'bench' is a eval stage", "judge"),
    (("    against: sft", "    against: nowhere/model.safetensors"), "against: 'nowhere/model.safetensors' is "
     "neither", "against"),
    (("    judge_template: helpful", "    judge_template: missing.txt"), "judge_template: 'missing.txt' not found",
     "judge_template"),
    (("    generate: false", "    generate: false\n    num_fewshot: 2"), "num_fewshot: only with `tasks:`",
     "num_fewshot"),
    (("    generate: false", "    generate: false\n    reward: math_answer"),
     "reward: no effect with `generate: false` (rewards score generated answers)", "reward"),
    (("    generate: false", "    generate: false\n    max_new_tokens: 8"),
     "max_new_tokens: no effect with `generate: false`", "max_new_tokens"),
    (("    limit: 2\n    batch_size: 2", "    limit: 2\n    batch_size: 2\n    num_fewshot: -1"),
     "num_fewshot: must be a whole number, at least 0", "num_fewshot"),
])
def test_eval_stage_errors_name_the_line_and_key(tiny_model_dir, tmp_path, edit, message, key):
    from tunekit.pipeline.resolve import resolve_pipeline
    from tunekit.pipeline.spec import read_pipeline

    pytest.importorskip("lm_eval")
    path = _eval_pipeline(tmp_path, tiny_model_dir)
    text = path.read_text()
    assert edit[0] in text
    text = text.replace(*edit, 1)
    path.write_text(text)
    with pytest.raises(TunekitError) as info:
        resolve_pipeline(read_pipeline(path))
    edited = text[:text.index(edit[1])].count("\n") + 1 if edit[1] else 1
    line = next(i for i, row in enumerate(text.splitlines(), 1) if i >= edited and row.startswith(f"    {key}:"))
    assert str(info.value).startswith(f"{path}:{line}: stage '") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_eval_stage_bad_task_is_one_error_line_before_anything_runs(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    path = _eval_pipeline(tmp_path, tiny_model_dir, tasks="tunekit_demo,tunekit_prf")
    proc = run_cli("run", path, cwd=tmp_path)
    line = path.read_text().splitlines().index("    tasks: tunekit_demo,tunekit_prf") + 1
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith(f"error: {path}:{line}: stage 'bench': tasks: unknown task 'tunekit_prf'; did you "
                             "mean tunekit_pref"), err
    assert not (tmp_path / "out").exists()
