"""`tunekit eval` modes: lm_eval tasks on our loaded model equal our own scoring of the same items (plain model
and a chained run), --against prints both, the pairwise judge is order-symmetric, a judge run on identical
targets is a coin flip within its CI, math-verify decides what the numeric path cannot, one eval.json shape."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import QA, write_jsonl
from tunekit.cli.app import app

pytest.importorskip("lm_eval")

PREF = "tunekit/assets/align/pref_eval.jsonl"
DEMO = "tunekit/assets/demo/eval.jsonl"


def _rows(path: str, n: int) -> list[dict]:
    from tunekit.evaluation.harness import ASSETS

    lines = (ASSETS / path.split("assets/", 1)[1]).read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def _loglik(model, tok, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens | context), the continuation's tokens being those of context+continuation
    after the context's own tokens (how a causal LM scores a choice)."""
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


def _greedy_line(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def _check_against_own_scoring(model, tok, results, n: int) -> None:
    from tunekit.evaluation.harness import metrics_of

    samples = {t: sorted(s, key=lambda x: x["doc_id"]) for t, s in results["samples"].items()}
    # multiple choice: per-item log-likelihoods of chosen and rejected, and acc = P[ll_c > ll_r]
    own_acc = []
    for row, s in zip(_rows(PREF, n), samples["tunekit_pref"]):
        ctx = f"Question: {row['prompt']}\nAnswer:"
        mine = [_loglik(model, tok, ctx, " " + row["chosen"]), _loglik(model, tok, ctx, " " + row["rejected"])]
        theirs = [r[0] for r in s["filtered_resps"]]
        assert mine == pytest.approx(theirs, abs=2e-3)
        own_acc.append(float(mine[0] > mine[1]))
    assert metrics_of(results)["tunekit_pref/acc"]["value"] == pytest.approx(sum(own_acc) / n)
    # generate_until: the same greedy continuation, cut at the first newline, and exact match on it
    own_em = []
    for row, s in zip(_rows(DEMO, n), samples["tunekit_demo"]):
        mine = _greedy_line(model, tok, row["instruction"], 16)
        assert mine == s["filtered_resps"][0]
        own_em.append(float(mine.strip() == row["output"].strip()))
    assert metrics_of(results)["tunekit_demo/exact_match"]["value"] == pytest.approx(sum(own_em) / n)


def test_local_tasks_on_a_tiny_model_equal_our_own_scoring(tiny_model_dir):
    from tunekit.evaluation.harness import run_tasks, select_tasks
    from tunekit.models.trained import load_any

    model, tok = load_any(str(tiny_model_dir))
    selection = select_tasks("tunekit_pref,tunekit_demo")
    assert selection.names == ["tunekit_pref", "tunekit_demo"]
    results = run_tasks(model, tok, selection, limit=6, batch_size=4)
    _check_against_own_scoring(model, tok, results, 6)


@pytest.fixture(scope="module")
def chained_run(tiny_model_dir, tmp_path_factory):
    """An sft run trained on top of another sft run (its adapter chained onto the folded first one)."""
    from tunekit.config import load_recipe
    from tunekit.stages.sft import run_sft

    root = tmp_path_factory.mktemp("evalchain")
    data = write_jsonl(root / "qa.jsonl", QA)

    def recipe(model_name, out, *extra):
        return load_recipe(None, [f"model.name={model_name}", f"data.train={data}", f"output={out}",
                                  "train.max_steps=2", "train.batch_size=2", "train.lr=5e-2", "train.save_steps=0",
                                  "generate.samples=0", "data.max_length=64", *extra])

    first = run_sft(recipe(tiny_model_dir, root / "sft"))
    return run_sft(recipe(first.path, root / "sft2", "adapter.r=4")).path


@pytest.mark.slow
def test_local_tasks_on_a_chained_run_equal_our_own_scoring(chained_run, tiny_model_dir):
    from tunekit.evaluation.harness import run_tasks, select_tasks
    from tunekit.models.load import chain_of
    from tunekit.models.trained import load_any
    from tunekit.run.locate import locate

    assert chain_of(locate(str(chained_run)).base)  # the run really is a chain
    model, tok = load_any(str(chained_run))
    results = run_tasks(model, tok, select_tasks("tunekit_pref,tunekit_demo"), limit=4, batch_size=4)
    _check_against_own_scoring(model, tok, results, 4)
    base, btok = load_any(str(tiny_model_dir))  # the adapters changed what lm_eval measured
    row = _rows(PREF, 1)[0]
    ctx = f"Question: {row['prompt']}\nAnswer:"
    tuned = sorted(results["samples"]["tunekit_pref"], key=lambda s: s["doc_id"])[0]["filtered_resps"][0][0]
    assert abs(_loglik(base, btok, ctx, " " + row["chosen"]) - tuned) > 1e-3


def test_against_prints_both_and_writes_one_eval_json(tmp_path, tiny_model_dir, tiny_model_dir_b):
    out = tmp_path / "ev" / "eval.json"
    res = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--tasks", "tunekit_pref", "--limit", "4",
                                   "--against", str(tiny_model_dir_b), "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "tunekit-eval/1" and doc["mode"] == "tasks" and doc["baseline"] == str(tiny_model_dir_b)
    acc = doc["metrics"]["tunekit_pref/acc"]
    assert {"value", "stderr", "baseline", "difference"} <= set(acc)
    assert acc["difference"] == pytest.approx(acc["value"] - acc["baseline"]["value"])
    assert "lm_eval" in doc["versions"] and len(doc["details"]["target"]) == len(doc["details"]["baseline"]) == 4
    assert "baseline" in res.output and "difference" in res.output  # the table, both columns
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["metrics"] == doc["metrics"] and "details" not in summary
    again = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--tasks", "tunekit_pref", "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_bad_task_and_option_errors_come_before_any_model(tmp_path, tiny_model_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "no/such-model", "--tasks", "tunekit_prf", "-o", str(tmp_path / "e.json")])
    assert res.exit_code == 2 and "unknown task 'tunekit_prf'" in res.output and "tunekit_pref" in res.output
    assert not (tmp_path / "e.json").exists() and "Traceback" not in res.output
    yaml_missing = runner.invoke(app, ["eval", "no/such-model", "--tasks", str(tmp_path / "missing.yaml")])
    assert yaml_missing.exit_code == 2 and "not found" in yaml_missing.output
    for args, message in ((["--tasks", "tunekit_pref", "--data", PREF], "--data: no effect with --tasks"),
                          (["--judge", str(tiny_model_dir), "--data", PREF], "needs --against"),
                          (["--num-fewshot", "2", "--data", PREF], "--num-fewshot: only with --tasks"),
                          (["--judge-template", "helpful", "--data", PREF], "only with --judge"),
                          (["--data", PREF, "--reward", "math_answr"], "did you mean 'math_answer'"),
                          (["--data", PREF, "--reward", ""], "--reward: empty name"),
                          ([], "--data: required")):
        res = runner.invoke(app, ["eval", "no/such-model", *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)


def test_task_yaml_path_and_folder_are_local_tasks(tmp_path, tiny_model_dir):
    """A user's task YAML over a jsonl (lm_eval's dataset_path: json), named by its path or its folder."""
    from tunekit.evaluation.harness import metrics_of, run_tasks, select_tasks
    from tunekit.models.trained import load_any

    folder = tmp_path / "tasks"
    folder.mkdir()
    data = write_jsonl(folder / "yn.jsonl", [{"q": f"Is {i} even?", "a": "yes" if i % 2 == 0 else "no"}
                                             for i in range(6)])
    (folder / "yn.yaml").write_text(
        "task: my_yes_no\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['yes', 'no']\n"
        "doc_to_target: \"{{['yes', 'no'].index(a)}}\"\nmetric_list:\n  - metric: acc\n")
    by_file = select_tasks(str(folder / "yn.yaml"))
    by_folder = select_tasks(str(folder))
    assert by_file.names == by_folder.names == ["my_yes_no"]
    model, tok = load_any(str(tiny_model_dir))
    results = run_tasks(model, tok, by_file, batch_size=6)
    own = [float(_loglik(model, tok, f"Is {i} even?", " yes") > _loglik(model, tok, f"Is {i} even?", " no"))
           == float(i % 2 == 0) for i in range(6)]
    assert metrics_of(results)["my_yes_no/acc"]["value"] == pytest.approx(sum(own) / 6)


# ---- pairwise judge ----

PROMPTS = [[{"role": "user", "content": q["instruction"]}] for q in QA[:6]]
GOOD = [q["output"] for q in QA[:6]]
BAD = ["I don't know.", "7", "Lyon, I think.", "Hola.", "Maybe.", "3 2 1"]


def test_judge_verdict_is_the_complement_in_the_swapped_order(tiny_model_dir):
    from tunekit.evaluation.judge import TEMPLATES, judge_answers
    from tunekit.models.trained import load_any

    judge, tok = load_any(str(tiny_model_dir))
    questions = list(TEMPLATES["helpful-harmless"])
    fwd = judge_answers(judge, tok, PROMPTS, GOOD, BAD, questions, batch_size=4)
    rev = judge_answers(judge, tok, PROMPTS, BAD, GOOD, questions, batch_size=4)
    swap = {"win": "loss", "loss": "win", "tie": "tie"}
    for f, r in zip(fwd, rev):
        assert r.p_target == pytest.approx(1 - f.p_target, abs=1e-6)
        assert r.as_a == pytest.approx(1 - f.as_b, abs=1e-6) and r.as_b == pytest.approx(1 - f.as_a, abs=1e-6)
        assert r.outcome == swap[f.outcome] and r.flipped == f.flipped


def test_verdict_rules_and_win_rate_by_hand():
    from tunekit.evaluation.judge import length_controlled, summarize, verdict
    from tunekit.evaluation.stats import wilson_interval

    assert verdict([(0.8, 0.7), (0.6, 0.9)], False).outcome == "win"
    assert verdict([(0.2, 0.3)], False).outcome == "loss"
    flip = verdict([(0.9, 0.2)], False)  # the judge picks whatever is shown as (A)
    assert flip.outcome == "tie" and flip.flipped and flip.p_target == pytest.approx(0.55)
    same = verdict([(0.9, 0.1)], True)
    assert same.outcome == "tie" and not same.flipped
    vs = [verdict([(0.8, 0.8)], False)] * 3 + [verdict([(0.2, 0.2)], False), flip]
    metrics, _ = summarize(vs, [10] * 5, [10] * 5)
    assert metrics["win_rate"]["value"] == pytest.approx((3 + 0.5) / 5)
    assert metrics["position_bias_rate"]["value"] == pytest.approx(1 / 5)
    lo, hi = metrics["win_rate"]["ci"]
    assert lo < 0.7 < hi
    # equal lengths: the length-controlled win rate is the logistic fit of the mean preference alone
    p = [0.8, 0.8, 0.8, 0.2, 0.55]
    assert length_controlled(p, [5] * 5, [5] * 5) == pytest.approx(sum(p) / 5, abs=1e-6)
    # Wilson interval of 8/10 (hand values: 0.4902, 0.9433)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_length_warning_when_the_longer_answer_wins():
    from tunekit.evaluation.judge import summarize, verdict

    vs = [verdict([(0.9, 0.9)], False)] * 6 + [verdict([(0.1, 0.1)], False)] * 2
    _, warnings = summarize(vs, [200] * 6 + [10] * 2, [20] * 6 + [100] * 2)
    assert any("longer answer won 8 of 8" in w for w in warnings)
    _, quiet = summarize(vs, [20] * 8, [20] * 8)
    assert not quiet


def test_judge_on_identical_targets_is_a_coin_flip_within_its_ci(tmp_path, tiny_model_dir, tiny_model_dir_b):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q["instruction"]} for q in QA[:6]])
    out = tmp_path / "j" / "eval.json"
    res = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--against", str(tiny_model_dir), "--judge",
                                   str(tiny_model_dir_b), "--data", str(prompts), "--max-new-tokens", "6",
                                   "--judge-template", "constitution", "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    lo, hi = doc["metrics"]["win_rate"]["ci"]
    assert doc["mode"] == "judge" and lo <= 0.5 <= hi and doc["metrics"]["win_rate"]["value"] == 0.5
    rows = [json.loads(line) for line in (out.parent / "judgements.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["target"] == r["baseline"] for r in rows)
    assert all(r["p_target"] == pytest.approx(0.5, abs=1e-6) for r in rows)  # both orders: exactly ½
    assert len(doc["settings"]["questions"]) >= 3 and doc["metrics"]["mean_length_target"]["value"] >= 0


# ---- math-verify ----

@pytest.mark.parametrize("completion, reference, expected", [
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("So x = 0.5", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),  # the numeric path reads 2 and fails
    ("\\boxed{\\sqrt{2}/2}", "\\frac{1}{\\sqrt{2}}", True),
    ("The total is 1,234 dollars.", "1234", True),
    ("#### 1,234", "#### 1234", True),
    ("The solutions are \\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", True),
    ("The solutions are \\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", False),
    ("\\boxed{[0, 1)}", "[0,1)", True),
    ("\\boxed{(0, 1)}", "[0,1]", False),
    ("\\boxed{2}", "\\{1,2\\}", False),  # a set's last number is not the set
    ("The answer is 71.", "72", False),
])
def test_math_answer_agrees_with_math_verify(completion, reference, expected):
    from tunekit.rewards.answers import answer_correct

    assert answer_correct(completion, reference) is expected


def test_numeric_path_decides_exact_numbers_without_math_verify(monkeypatch):
    from tunekit.rewards import answers

    def boom(*a, **k):
        raise AssertionError("math-verify called")

    monkeypatch.setattr(answers, "verified_match", boom)
    assert answers.answer_correct("#### 72", 72) is True
    assert answers.answer_correct("so 3/4 of it", "0.75") is True
    reward = answers.math_answer()
    assert reward(completions=["It is 12.", "x"], answer=["#### 12", None]) == [1.0, None]


def test_math_answer_reward_uses_math_verify_for_latex():
    from tunekit.rewards.answers import math_answer

    reward = math_answer()
    assert reward(completions=["\\boxed{\\frac{\\sqrt{2}}{2}}", "\\boxed{3}"],
                  answer=["\\frac{1}{\\sqrt{2}}", "\\frac{1}{\\sqrt{2}}"]) == [1.0, 0.0]


# ---- preference data: say what is measured ----

@pytest.mark.slow
def test_eval_of_an_sft_run_on_pairs_is_logprob_accuracy_without_beta(chained_run):
    res = CliRunner().invoke(app, ["eval", str(chained_run), "--data", PREF, "--limit", "6"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["mode"] == "preference" and "beta" not in doc["settings"] and doc["settings"]["stage"] == "sft"
    assert set(doc["metrics"]) == {"logprob_accuracy", "mean_logprob_margin"}
    assert "log-prob preference accuracy of a policy" in doc["measures"] and "β" not in doc["measures"]
    lo, hi = doc["metrics"]["logprob_accuracy"]["ci"]
    assert 0 <= lo <= doc["metrics"]["logprob_accuracy"]["value"] <= hi <= 1 and not math.isnan(lo)


def test_run_eval_returns_the_eval_json_document(tiny_model_dir):
    """The function the pipeline's eval stage calls gives the same document as `tunekit eval -o`."""
    from tunekit.evaluation.command import EvalRequest, run_eval

    doc = run_eval(EvalRequest(str(tiny_model_dir), data=DEMO, limit=3, generate=False))
    assert doc["schema"] == "tunekit-eval/1" and doc["mode"] == "perplexity" and doc["n"] == 3
    assert doc["metrics"]["perplexity"]["value"] == pytest.approx(math.exp(doc["metrics"]["loss"]["value"]))
    assert "exact_match" not in doc["metrics"] and doc["settings"]["data"] == DEMO


def test_apply_chat_template_renders_task_prompts_as_a_user_turn(tiny_model_dir):
    """--apply-chat-template: lm_eval's greedy answer equals ours from the chat-rendered prompt."""
    from tunekit.data.templates import render
    from tunekit.evaluation.harness import run_tasks, select_tasks
    from tunekit.models.trained import load_any

    model, tok = load_any(str(tiny_model_dir))
    results = run_tasks(model, tok, select_tasks("tunekit_demo"), limit=3, batch_size=3, apply_chat_template=True)
    samples = sorted(results["samples"]["tunekit_demo"], key=lambda s: s["doc_id"])
    for row, s in zip(_rows(DEMO, 3), samples):
        prompt = render(tok, [{"role": "user", "content": row["instruction"]}], generation_prompt=True)
        assert s["arguments"][0][0] == prompt
        assert _greedy_line(model, tok, prompt, 16) == s["filtered_resps"][0]
