"""`tunekit cai` on a tiny model: constitution errors, the degenerate filter, the multiple-choice score against a
hand computation from the logits, swap symmetry, every artifact's fields, and resume after SIGKILL."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, run_cli, write_jsonl
from tunekit.cai.constitution import load_constitution, parse_constitution
from tunekit.cai.critique import FILTERS, RECORD_FIELDS, degenerate_reason, is_repetitive, word_similarity
from tunekit.cai.feedback import PREFERENCE_FIELDS, judge_pairs, preference_record
from tunekit.cai.log import AppendLog
from tunekit.errors import TunekitError
from tunekit.evaluation.choice import LABELS, choice_logprobs, judgement_context, prob_first

PROMPTS = ["Say hello.", "Capital of France?", "Add 2 and 3.", "Yes or no?", "Count to three.", "Say bye.",
           "Opposite of up?", "Translate good morning to French."]


@pytest.fixture(scope="module")
def stopping_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its EOS row of lm_head scaled ×3, so that (like a real chat model) it ends some answers
    and runs out of budget on others: the filter sees both kept and truncated/empty revisions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 3.0
    out = tmp_path_factory.mktemp("stopping") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(stopping_model_dir):
    from tunekit.config.schema import ModelConfig
    from tunekit.models.load import load_model, load_tokenizer

    cfg = ModelConfig(name=str(stopping_model_dir))
    tok = load_tokenizer(cfg)
    return load_model(cfg, tok).eval(), tok


def _prompt_file(path, n=len(PROMPTS)):
    return write_jsonl(path, [{"id": f"p{i:02d}", "prompt": PROMPTS[i % len(PROMPTS)] + f" #{i}"} for i in range(n)])


# ------------------------------------------------------------------------------------------- constitution


def test_default_constitution_loads():
    c = load_constitution()
    assert {"harmless", "honest", "helpful"} <= {p.id for p in c.principles}
    assert all(p.critique and p.revision and p.comparison for p in c.principles)
    assert parse_constitution(c.to_yaml()) == c  # the copy written into the run directory reads back the same


GOOD = """name: t
principles:
  - id: a
    critique: Find harm.
    revision: Remove harm.
    comparison: Which is safer?
  - id: b
    critique: Find lies.
    revision: Fix lies.
    comparison: Which is truer?
"""


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("    revision: Fix lies.\n", ""), "c.yaml:7: principle 'b': missing key 'revision'"),
        (("  - id: b", "  - id: a"), "c.yaml:7: principle 'a': duplicate id (first on line 3)"),
        (("    comparison: Which is truer?", "    comparison: '  '"), "c.yaml:10: principle 'b': 'comparison' must"),
        (("    revision: Remove harm.", "    revison: Remove harm."), "c.yaml:5: principle 'a': unknown key 'revison'"),
        (("  - id: b", "  - id: Bad Id"), "c.yaml:7: principle 'Bad Id': id must match"),
        (("principles:", "rules:"), "c.yaml:2: unknown key 'rules'"),
        (("    critique: Find lies.", "    critique: [unclosed"), "c.yaml:9: invalid YAML"),
    ],
)
def test_malformed_constitution_names_file_line_principle(tmp_path, edit, message):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(TunekitError) as err:
        load_constitution(path)
    assert str(err.value).startswith(str(tmp_path / message)), str(err.value)


def test_cli_bad_constitution_is_one_line_and_writes_nothing(tmp_path, stopping_model_dir):
    bad = tmp_path / "c.yaml"
    bad.write_text(GOOD.replace("    revision: Fix lies.\n", ""))
    res = run_cli("cai", "--set", f"model.name={stopping_model_dir}", "--set", f"cai.constitution={bad}",
                  "-o", tmp_path / "run")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == f"error: {bad}:7: principle 'b': missing key 'revision'"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- phase-1 pieces


def test_degenerate_reasons():
    assert degenerate_reason("   ", True) == "empty"
    assert degenerate_reason("A fine answer.", False) == "truncated"
    assert degenerate_reason("no no no no " * 6, True) == "repeated"
    assert degenerate_reason("Please rewrite it. Rewrite the answer kindly.", True, "rewrite the answer kindly.") \
        == "repeated"
    assert degenerate_reason("I can't help with that, but here is a safer idea: ask them first.", True) is None
    # echo: the revision restates the critique (seen with SmolLM2-135M) or a request, instead of answering
    critique = "The assistant's last answer could help someone cause harm or break the law."
    assert degenerate_reason(critique, True, "Rewrite it safely.", (critique,)) == "echo"
    assert degenerate_reason("The answer could help someone cause harm or break the law.", True, "", (critique,)) \
        == "echo"  # all 11 of its words match the 13-word critique in order: 2*11/(11+13) = 0.92
    safe = "I can't help with hurting anyone; talking to them calmly usually works better."
    assert degenerate_reason(safe, True, "Rewrite it safely.", (critique,)) is None
    assert word_similarity("a b c d", "a b x y") == 0.5  # 2*2/(4+4)
    # 12 words, 9 distinct 4-grams of 9: not a loop; the same 4 words three times: 3 distinct of 9
    assert not is_repetitive("one two three four five six seven eight nine ten eleven twelve")
    assert is_repetitive("a b c d a b c d a b c d")


def test_append_log_cuts_a_torn_line_and_never_duplicates(tmp_path):
    path = tmp_path / "log.jsonl"
    log = AppendLog(path)
    log.append([{"id": "a", "x": 1}, {"id": "b", "x": 2}])
    with path.open("a") as fh:
        fh.write('{"id": "c", "x"')  # killed mid-write
    log = AppendLog(path)
    assert log.repaired and list(log.records) == ["a", "b"]
    log.append([{"id": "b", "x": 99}, {"id": "c", "x": 3}])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a", "b", "c"] and lines[1]["x"] == 2


# ------------------------------------------------------------------------------------------- phase-2 scoring


def test_mc_score_equals_hand_computation_from_logits(loaded):
    model, tok = loaded
    c = load_constitution()
    prompt = [{"role": "user", "content": "Capital of France?"}]
    contexts = [judgement_context(tok, prompt, c.principles[0].comparison, "Paris.", "I won't say."),
                judgement_context(tok, prompt, c.principles[1].comparison, "It is Paris, the capital.", "Lyon.")]
    assert contexts[0].endswith("The answer is (")
    got = choice_logprobs(model, tok, contexts, batch_size=2)  # one right-padded batch of unequal lengths
    a_id, b_id = (tok(label, add_special_tokens=False)["input_ids"] for label in LABELS)
    assert len(a_id) == len(b_id) == 1
    for ctx, (lp_a, lp_b) in zip(contexts, got):
        ids = torch.tensor([tok(ctx, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        z = logits.exp().sum()  # log p = logit − log Σ exp(logits), by hand
        hand_a, hand_b = float(logits[a_id[0]] - z.log()), float(logits[b_id[0]] - z.log())
        assert lp_a == pytest.approx(hand_a, abs=1e-4) and lp_b == pytest.approx(hand_b, abs=1e-4)
        hand_p = math.exp(hand_a) / (math.exp(hand_a) + math.exp(hand_b))
        assert prob_first(lp_a, lp_b) == pytest.approx(hand_p, abs=1e-5)
    # judge_pairs = mean over principles of P(A | x first) and P(B | x second)
    [j] = judge_pairs(model, tok, c, [("q", prompt, "Paris.", "Lyon.")], k=2, seed=0)
    hand = []
    for pid in j.principles:
        pr = c.by_id(pid)
        q = pr.comparison
        (a1, b1), (a2, b2) = choice_logprobs(model, tok, [judgement_context(tok, prompt, q, "Paris.", "Lyon."),
                                                          judgement_context(tok, prompt, q, "Lyon.", "Paris.")])
        hand += [math.exp(a1) / (math.exp(a1) + math.exp(b1)), math.exp(b2) / (math.exp(a2) + math.exp(b2))]
    assert j.p_first == pytest.approx(sum(hand) / len(hand), abs=1e-6)
    assert len(set(j.principles)) == 2


def test_swapping_the_pair_flips_the_preference_and_keeps_the_confidence(loaded):
    model, tok = loaded
    c = load_constitution()
    items = [("p1", [{"role": "user", "content": "Say hello."}], "Hello!", "Go away."),
             ("p2", [{"role": "user", "content": "Add 2 and 3."}], "5", "It is 7, trust me."),
             ("p3", [{"role": "user", "content": "Yes or no?"}], "Yes.", "No.")]
    fwd = judge_pairs(model, tok, c, items, k=3, seed=1)
    rev = judge_pairs(model, tok, c, [(i, p, b, a) for i, p, a, b in items], k=3, seed=1)
    for (pid, prompt, a, b), f, r in zip(items, fwd, rev):
        assert f.principles == r.principles
        assert r.p_first == pytest.approx(1.0 - f.p_first, abs=1e-6)
        assert r.confidence == pytest.approx(f.confidence, abs=1e-6)
        rf, rr = preference_record(pid, prompt, a, b, f), preference_record(pid, prompt, b, a, r)
        assert (rf["chosen"], rf["rejected"]) == (rr["chosen"], rr["rejected"])
        assert rf["confidence"] == pytest.approx(rr["confidence"], abs=1e-5)
        for s_f, s_r in zip(rf["scores"], rr["scores"]):
            assert s_f["principle"] == s_r["principle"]
            assert (s_f["as_a"], s_f["as_b"]) == pytest.approx((s_r["as_a"], s_r["as_b"]), abs=1e-5)
        for s in rf["scores"]:  # re-expressed for the chosen answer: averaging them gives p_chosen
            assert 0.0 <= s["as_a"] <= 1.0 and 0.0 <= s["as_b"] <= 1.0
        mean = sum(s["as_a"] + s["as_b"] for s in rf["scores"]) / (2 * len(rf["scores"]))
        assert mean == pytest.approx(rf["p_chosen"], abs=1e-5) and rf["p_chosen"] >= 0.5
    # one order alone is position-biased on this model; the two-order average is what makes the swap exact
    assert any(abs(s["as_a"] - s["as_b"]) > 1e-3 for j in fwd for s in j.scores)


# ------------------------------------------------------------------------------------------- the stage


def _cai_recipe(model_dir, prompts, out, *extra):
    from tunekit.config.load import load_recipe

    return load_recipe(None, ["stage=cai", f"model.name={model_dir}", f"output={out}", f"cai.prompts={prompts}",
                              "cai.max_new_tokens=24", "cai.critique_max_new_tokens=12", "cai.generation_batch_size=4",
                              f"cai.eval_prompts={prompts}", "cai.eval_max_prompts=4", "cai.revision_rounds=2",
                              "train.max_steps=2", "train.batch_size=2", "train.save_steps=0", "train.lr=1e-3",
                              "generate.samples=0", "adapter.r=4", *extra])


@pytest.mark.slow
def test_phases_write_every_documented_field(tmp_path, stopping_model_dir):
    from tunekit.stages.cai import run_cai

    prompts = _prompt_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "run"
    recipe = _cai_recipe(stopping_model_dir, prompts, out)
    run_cai(recipe, phase="critique")
    with pytest.raises(TunekitError, match="already done"):  # a finished phase is not redone silently
        run_cai(recipe, phase="critique")
    run_cai(recipe, phase="all", resume=True)  # skips critique, runs sft, feedback, dpo, eval
    crit = [json.loads(x) for x in (out / "critique.jsonl").read_text().splitlines()]
    assert [r["id"] for r in crit] == [f"p{i:02d}" for i in range(len(PROMPTS))]
    for r in crit:
        assert tuple(r) == RECORD_FIELDS
        assert len(r["principles"]) == len(r["critiques"]) == len(r["revisions"]) == len(r["filters"]) == 2
        kept = [rev for rev, f in zip(r["revisions"], r["filters"]) if f is None]
        assert r["final"] == (kept[-1] if kept else None)
    state = json.loads((out / "cai_state.json").read_text())["phases"]
    assert [state[p]["status"] for p in ("critique", "sft", "feedback", "dpo", "eval")] == ["done"] * 5
    stats = state["critique"]["stats"]
    flat = [f for r in crit for f in r["filters"]]
    assert stats["revisions"] == len(flat) == 16 and stats["kept"] == flat.count(None)
    assert stats["filtered"] == {k: flat.count(k) for k in FILTERS}
    assert 0 < stats["kept"] < 16, stats  # the filter both keeps and drops on this model
    sft_rows = [json.loads(x) for x in (out / "sft_data.jsonl").read_text().splitlines()]
    assert len(sft_rows) == stats["with_target"] == sum(r["final"] is not None for r in crit)
    finals = {r["final"] for r in crit if r["final"] is not None}
    assert all(m["messages"][-1]["role"] == "assistant" and m["messages"][-1]["content"] in finals for m in sft_rows)
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "constitution.yaml").is_file() and (out / "recipe.yaml").is_file()
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == len(PROMPTS) and all(len(p["responses"]) == 2 for p in pairs)
    prefs = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    fb = state["feedback"]["stats"]
    assert len(prefs) == fb["kept"] > 0 and fb["kept"] + fb["dropped_identical"] + fb["dropped_low_confidence"] == 8
    for p in prefs:
        assert tuple(p) == PREFERENCE_FIELDS and p["chosen"] != p["rejected"]
        assert p["confidence"] == pytest.approx(2 * p["p_chosen"] - 1, abs=1e-5)
        assert {p["chosen"], p["rejected"]} == set(next(q for q in pairs if q["id"] == p["id"])["responses"])
    # dpo trained from the folded phase-1 model, on exactly these pairs
    dpo_card = json.loads((out / "dpo" / "run_card.json").read_text())
    assert dpo_card["finished"] and dpo_card["data"]["train_pairs"] + dpo_card["data"]["eval_pairs"] == len(prefs)
    assert [link["path"] for link in dpo_card["chained_from"]] == [str((out / "sft").resolve())]
    assert not (out / "sft_merged").exists() and (out / "dpo" / "adapter").is_dir()  # folded in memory
    card = json.loads((out / "run_card.json").read_text())
    assert card["stage"] == "cai" and set(card["phases"]) == {"critique", "sft", "feedback", "dpo", "eval"}
    summary = json.loads((out / "eval.json").read_text())
    assert summary["final_model"] == "dpo"
    assert summary["prompts"] == 4 and summary["final_preferred"] + summary["start_preferred"] + summary["ties"] == 4
    rows = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert summary["mean_p_final"] == pytest.approx(sum(r["p_final"] for r in rows) / 4, abs=1e-4)
    # min_confidence drops pairs: redo feedback with a threshold between the observed confidences
    conf = sorted(p["confidence"] for p in prefs)
    cut = (conf[0] + conf[-1]) / 2
    run_cai(_cai_recipe(stopping_model_dir, prompts, out, f"cai.min_confidence={cut}"), phase="feedback",
            overwrite=True)
    again = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    fb = json.loads((out / "cai_state.json").read_text())["phases"]["feedback"]["stats"]
    assert all(p["confidence"] >= cut for p in again) and fb["dropped_low_confidence"] >= 1
    assert not (out / "dpo").exists()  # --overwrite of a phase discards the phases built on it


def test_later_phase_needs_the_earlier_one(tmp_path, stopping_model_dir):
    from tunekit.stages.cai import run_cai

    recipe = _cai_recipe(stopping_model_dir, _prompt_file(tmp_path / "p.jsonl"), tmp_path / "run")
    with pytest.raises(TunekitError, match="needs phase 'sft'"):
        run_cai(recipe, phase="feedback")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigkill_mid_critique_resumes_without_duplicates_or_losses(tmp_path, stopping_model_dir):
    n = 16
    prompts = _prompt_file(tmp_path / "prompts.jsonl", n)
    out = tmp_path / "run"
    log = out / "critique.jsonl"
    args = ["-m", "tunekit", "cai", "--phase", "critique", "-o", str(out), "--set", f"model.name={stopping_model_dir}",
            "--set", f"cai.prompts={prompts}", "--set", "cai.generation_batch_size=2", "--set", "cai.max_new_tokens=24",
            "--set", "cai.critique_max_new_tokens=16"]
    err = (tmp_path / "stderr.txt").open("w")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 900  # a loaded 2-core CI box needs minutes to import and load
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + (tmp_path / "stderr.txt").read_text()
    assert log.is_file(), "no prompt finished within the deadline"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = log.read_text().splitlines()
    assert 1 <= len(before) < n
    res = run_cli("cai", "--phase", "critique", "-o", out, "--set", f"model.name={stopping_model_dir}",
                  "--set", f"cai.prompts={prompts}")  # without --resume: refused
    assert res.returncode == 2 and "--resume" in res.stderr
    res = run_cli(*args[2:], "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    after = log.read_text().splitlines()
    ids = [json.loads(x)["id"] for x in after]
    assert sorted(ids) == [f"p{i:02d}" for i in range(n)]  # none lost, none twice
    assert after[: len(before)] == before  # finished prompts were not redone
    state = json.loads((out / "cai_state.json").read_text())["phases"]["critique"]
    assert state["status"] == "done" and state["stats"]["revisions"] == n


def _tree(path):
    import hashlib

    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_overwrite_keeps_the_finished_phase_until_its_redo_is_complete(tmp_path, stopping_model_dir):
    """--overwrite must not delete a finished phase before its redo succeeded: a redo that fails late (bad input
    met after generating) or is killed leaves the finished files as they were."""
    n = 16
    prompts = _prompt_file(tmp_path / "prompts.jsonl", n)
    out = tmp_path / "run"
    args = ["cai", "--phase", "critique", "-o", out, "--set", f"model.name={stopping_model_dir}",
            "--set", f"cai.prompts={prompts}", "--set", "cai.generation_batch_size=2",
            "--set", "cai.max_new_tokens=24", "--set", "cai.critique_max_new_tokens=16"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    before = _tree(out)
    # 1. a redo that fails late: with one new token every revision is empty or truncated, found after generating
    res = run_cli(*args, "--overwrite", "--set", "cai.max_new_tokens=1")
    assert res.returncode == 2 and "every revision was filtered" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted({k.split("/")[0] for k in before})
    # 2. a redo killed once it has written part of its new critique.jsonl: the finished files are set aside, not
    #    deleted, and the next cai command on this output puts them back
    err = (tmp_path / "stderr.txt").open("w")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen([sys.executable, "-m", "tunekit", *map(str, args), "--overwrite"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=err)
    log, aside = out / "critique.jsonl", out / ".before-overwrite"
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if aside.is_dir() and log.is_file() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the redo ended before it could be killed: " + (tmp_path / "stderr.txt").read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert log.read_text().count("\n") < n and (aside / "critique.jsonl").is_file()
    res = run_cli(*args)  # without --overwrite: the finished phase is back, and not redone
    assert res.returncode == 2 and "already done" in res.stderr, res.stderr[-2000:]
    assert "restored the phases (critique, sft, feedback, dpo, eval)" in res.stderr
    assert _tree(out) == before and not aside.exists()
    # 3. a redo that completes replaces the phase
    res = run_cli(*args, "--overwrite", "--set", "cai.revision_rounds=2")
    assert res.returncode == 0, res.stderr[-2000:]
    state = json.loads((out / "cai_state.json").read_text())["phases"]["critique"]
    assert state["status"] == "done" and state["stats"]["revisions"] == 2 * n and not aside.exists()
