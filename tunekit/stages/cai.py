"""`tunekit cai`: Constitutional AI (Bai et al., 2022, arXiv:2212.08073) as a stage of five phases.

    critique  policy answers, critic critiques, policy revises (K rounds)   → critique.jsonl, sft_data.jsonl
    sft       SFT on (prompt, final revision) [+ helpfulness data]          → sft/       (tunekit sft)
    feedback  two samples per prompt from sft/, judged by the feedback model → pairs.jsonl, feedback.jsonl,
              (multiple-choice log-probs, k principles × both orders)          preferences.jsonl
    dpo       DPO on the AI-feedback preferences, chained from sft/ (its    → dpo/       (tunekit dpo)
              adapter folded in memory: the start and the reference model)
    eval      final vs start model on held-out prompts, judged the same way → eval.jsonl, eval.json

The run directory is built phase by phase (`cai_state.json` records each phase; `run_card.json` their counts).
A finished phase is not redone without --overwrite; an interrupted one continues with --resume (the jsonl
logs are append-only and keyed by prompt id; the sft/dpo sub-runs resume from their checkpoints). --overwrite
replaces a phase and the ones built on it only once the redo is complete: until then they are set aside in
`.before-overwrite/`, and put back when the redo fails or is interrupted (or, after a kill, by the next cai
command on that output).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tunekit.cai.constitution import Constitution, load_constitution
from tunekit.cai.critique import run_critique, sft_records
from tunekit.cai.feedback import judge_pairs, preference_record
from tunekit.cai.log import AppendLog
from tunekit.cai.prompts import Prompt, load_prompts, shipped_prompts
from tunekit.config.schema import Recipe
from tunekit.console import console
from tunekit.errors import TunekitError
from tunekit.run.atomic import partial_path, remove
from tunekit.run.card import run_card
from tunekit.stages.common import output_of

PHASES = ("critique", "sft", "feedback", "dpo", "eval")
NEEDS = {"sft": "critique", "feedback": "sft", "dpo": "feedback", "eval": "sft"}
ARTIFACTS = {
    "critique": ("critique.jsonl", "sft_data.jsonl"),
    "sft": ("sft", "sft.partial"),
    "feedback": ("pairs.jsonl", "feedback.jsonl", "preferences.jsonl"),
    "dpo": ("sft_merged", "dpo", "dpo.partial"),  # sft_merged/: the on-disk fold of runs made before chaining
    "eval": ("eval.jsonl", "eval.json"),
}
SHARED_SECTIONS = ("model", "data", "adapter", "train", "generate")
STATE = "cai_state.json"
RUN_FILES = (STATE, "run_card.json", "recipe.yaml", "constitution.yaml")  # rewritten by every phase
ASIDE = ".before-overwrite"  # finished phases an --overwrite redo replaces, kept until the redo is complete
MANIFEST = "manifest.json"


class CaiRun:
    """The cai run directory and its per-phase state (`cai_state.json`)."""

    def __init__(self, path: Path):
        self.path = path
        self.state: dict[str, Any] = {"phases": {}}
        if path.exists():
            if not (path / STATE).is_file():
                raise TunekitError(f"output '{path}' exists and is not a tunekit cai run (no {STATE})")
            from tunekit.errors import reading

            with reading(path / STATE):
                self.state = json.loads((path / STATE).read_text(encoding="utf-8"))
            if not isinstance(self.state, dict) or not isinstance(self.state.get("phases"), dict):
                raise TunekitError(f"{path / STATE}: not a cai state file (expected {{\"phases\": {{...}}}})")

    def status(self, phase: str) -> str | None:
        return self.state["phases"].get(phase, {}).get("status")

    def _save(self) -> None:
        tmp = self.path / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.path / STATE)

    def start(self, phase: str, recipe: Recipe) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        from tunekit.config.load import dump_recipe

        (self.path / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
        entry = self.state["phases"].setdefault(phase, {})
        entry["status"] = "running"
        entry.setdefault("started", time.time())
        self._save()

    def finish(self, phase: str, seconds: float, **info: Any) -> None:
        entry = self.state["phases"][phase]
        entry.update(status="done", seconds=round(entry.get("seconds", 0) + seconds, 2), **info)
        self._save()

    def set_aside(self, phases: list[str]) -> None:
        """--overwrite: move the artifacts of `phases` into `.before-overwrite/` (with copies of the run's state,
        card, recipe and constitution) instead of deleting them, and drop the phases from the state. The redo then
        writes in their place; `keep_redo()` discards what was set aside once every phase asked for is done,
        `restore()` puts it back when the redo fails, is interrupted or was killed. The manifest (what was moved,
        what did not exist) is complete before anything moves, so a restore after a kill at any point is exact."""
        aside, staging = self.path / ASIDE, self.path / (ASIDE + ".tmp")
        remove(staging)
        staging.mkdir()
        names = [n for ph in phases for n in ARTIFACTS[ph]]
        moved = [n for n in names if (self.path / n).exists() or (self.path / n).is_symlink()]
        copied = [n for n in RUN_FILES if (self.path / n).is_file()]
        for name in copied:
            shutil.copy2(self.path / name, staging / name)
        absent = [n for n in (*names, *RUN_FILES) if n not in moved and n not in copied]
        (staging / MANIFEST).write_text(json.dumps({"phases": phases, "moved": moved, "copied": copied,
                                                    "absent": absent}) + "\n")
        staging.rename(aside)
        for name in moved:
            os.replace(self.path / name, aside / name)
        for ph in phases:
            self.state["phases"].pop(ph, None)
        self._save()

    def keep_redo(self) -> None:
        """The redo is complete: discard what `set_aside` kept (the manifest goes first, so a kill while removing
        the rest leaves nothing that a later restore would put back)."""
        aside = self.path / ASIDE
        if aside.is_dir():
            (aside / MANIFEST).unlink(missing_ok=True)
            remove(aside)

    def restore(self) -> list[str]:
        """Undo an unfinished --overwrite: remove what the redo wrote, put the set-aside artifacts and run files
        back, reload the state. Returns the phases restored ([] when nothing was set aside). Safe to repeat."""
        aside = self.path / ASIDE
        remove(self.path / (ASIDE + ".tmp"))  # killed before anything moved
        if not aside.is_dir():
            return []
        from tunekit.errors import reading

        if not (aside / MANIFEST).is_file():  # killed while keep_redo() removed it: the redo was complete
            remove(aside)
            return []
        with reading(aside / MANIFEST):
            manifest = json.loads((aside / MANIFEST).read_text(encoding="utf-8"))
        for name in manifest["absent"]:
            remove(self.path / name)
        for name in [*manifest["moved"], *manifest["copied"]]:
            if (aside / name).exists() or (aside / name).is_symlink():
                remove(self.path / name)
                os.replace(aside / name, self.path / name)
        (aside / MANIFEST).unlink()
        remove(aside)
        self.state = CaiRun(self.path).state
        return list(manifest["phases"])


def _load(name: str):
    """(model, tokenizer) for an alias, hub id, model folder, adapter folder or finished run directory."""
    from tunekit.models.trained import load_any

    model, tok = load_any(name)
    model.eval()
    return model, tok


def _derive(recipe: Recipe, stage: str, model: str, train: Any, output: Path, key: str) -> Recipe:
    """A sub-run recipe: the cai recipe's shared sections with this stage's data, model and output."""
    from tunekit.config.load import load_recipe

    data = recipe.model_dump(mode="json", exclude_unset=True)
    keep = (*SHARED_SECTIONS, stage) if stage != "sft" else SHARED_SECTIONS
    base: dict[str, Any] = {k: v for k, v in data.items() if k in keep}
    base["stage"] = stage
    base["model"] = {**base.get("model", {}), "name": model}
    base["data"] = {**base.get("data", {}), "train": train}
    if stage != "sft":
        base["data"].pop("eval", None)
    base["output"] = str(output)
    overrides = [f"{k}={json.dumps(v)}" for k, v in getattr(recipe.cai, key).items()]
    try:
        return load_recipe(None, overrides, defaults=base)
    except TunekitError as exc:
        raise TunekitError(f"cai.{key}: {exc}") from None


def sft_recipe(recipe: Recipe, out: Path) -> Recipe:
    """Phase-1 SFT: the revisions (messages format) first, then the recipe's `data.train` (helpfulness data)."""
    train: list[dict[str, Any]] = [{"path": str(out / "sft_data.jsonl"), "format": "messages"}]
    extra = recipe.data.train
    if isinstance(extra, str):
        train.append({"path": extra})
    elif extra:
        train.extend(s.model_dump(mode="json", exclude_unset=True) for s in extra)
    return _derive(recipe, "sft", recipe.model.name, train, out / "sft", "sft_overrides")


def dpo_recipe(recipe: Recipe, out: Path) -> Recipe:
    """Phase-2 DPO on the AI-feedback preferences, chained from the phase-1 run: it starts from, and uses as
    reference, sft/ (its adapter folded into the base in memory by tunekit.models.load, as every stage chains)."""
    train = [{"path": str(out / "preferences.jsonl"), "format": "preference"}]
    return _derive(recipe, "dpo", str(out / "sft"), train, out / "dpo", "dpo_overrides")


def _eval_prompts(recipe: Recipe) -> list[Prompt] | None:
    spec = recipe.cai.eval_prompts
    if spec is None:
        return None
    path = shipped_prompts("heldout") if spec == "heldout" else spec
    return load_prompts(path, recipe.cai.eval_max_prompts)


def run_cai(recipe: Recipe, phase: str = "all", overwrite: bool = False, resume: bool = False) -> Path:
    """Run one phase or all of them (skipping finished ones with --resume); returns the run directory."""
    if phase != "all" and phase not in PHASES:
        raise TunekitError(f"--phase {phase}: expected one of {', '.join(PHASES)}, all")
    out = output_of(recipe)
    # Everything a user can get wrong is checked before any model loads or anything is written.
    constitution = load_constitution(recipe.cai.constitution)
    prompts = load_prompts(recipe.cai.prompts, recipe.cai.max_prompts)
    eval_prompts = _eval_prompts(recipe)
    for sub, name in ((sft_recipe(recipe, out), "sft"), (dpo_recipe(recipe, out), "dpo")):
        if Path(sub.output or "") != out / name:
            raise TunekitError(f"cai.{name}_overrides: output cannot be set (the {name} phase writes {out / name})")
    _check_models(recipe)
    # The shared output guard: never inside an input, writable, one writer at a time; --resume only with the
    # recipe the run was started with.
    from tunekit.run import guard

    guard.check_overlap(out, _inputs(recipe))
    guard.check_writable(out)
    held = guard.lock(out)
    try:
        _restore_unfinished_overwrite(out)
        if resume and (out / "recipe.yaml").is_file():
            from types import SimpleNamespace

            from tunekit.run.rundir import check_resume

            check_resume(recipe, SimpleNamespace(path=out))
        return _run_phases(recipe, out, phase, overwrite, resume, constitution, prompts, eval_prompts)
    finally:
        held.release()


def _restore_unfinished_overwrite(out: Path) -> None:
    """An --overwrite redo that was killed left the phases it replaces set aside: put them back (we hold the lock),
    so the finished work is what every later command sees."""
    leftover = (out / ASIDE).exists() or (out / (ASIDE + ".tmp")).exists()
    if not leftover or not (out / STATE).is_file():
        return
    restored = CaiRun(out).restore()
    if restored:
        print(f"note: restored the phases ({', '.join(restored)}) that an unfinished --overwrite of '{out}' had "
              "set aside", file=sys.stderr)


def _inputs(recipe: Recipe) -> list[Any]:
    """Files and folders a cai run reads: the recipe's model and data, the constitution, prompts and judges."""
    from tunekit.stages.common import recipe_inputs

    cfg = recipe.cai
    return [*recipe_inputs(recipe), cfg.constitution, cfg.prompts, cfg.critic_model, cfg.feedback_model,
            cfg.eval_prompts if cfg.eval_prompts != "heldout" else None]


def _check_models(recipe: Recipe) -> None:
    """The critic and feedback models must exist before the first phase (not after two phases of work)."""
    from tunekit.models.resolve import resolve_model

    for key in ("critic_model", "feedback_model"):
        name = getattr(recipe.cai, key)
        if name:
            try:
                resolve_model(str(name), need_config=False)
            except TunekitError as exc:
                raise TunekitError(f"cai.{key}: {exc}") from None


def _run_phases(recipe: Recipe, out: Path, phase: str, overwrite: bool, resume: bool, constitution: Constitution,
                prompts: list[Prompt], eval_prompts: list[Prompt] | None) -> Path:
    run = CaiRun(out)
    wanted = [p for p in PHASES if p != "eval" or eval_prompts is not None] if phase == "all" else [phase]
    if phase == "eval" and eval_prompts is None:
        raise TunekitError("--phase eval: cai.eval_prompts is null")
    need = NEEDS.get(wanted[0])
    if need and run.status(need) != "done":
        raise TunekitError(f"phase '{wanted[0]}' needs phase '{need}' done first (run --phase {need})")
    # --overwrite redoes the first phase asked for and discards every later one (they were built on it), but
    # only once the redo is complete: until then their files are set aside, and put back if it fails.
    redo = list(PHASES[PHASES.index(wanted[0]):]) if overwrite else []
    if any(run.status(ph) for ph in redo) or any((out / n).exists() for ph in redo for n in ARTIFACTS[ph]):
        run.set_aside(redo)
    try:
        for ph in wanted:
            status = None if overwrite else run.status(ph)
            if status == "done":
                if resume and phase == "all":
                    console.print(f"cai: phase {ph} already done")
                    continue
                raise TunekitError(f"phase '{ph}' is already done in '{out}'; pass --overwrite to redo it")
            if status == "running" and not resume:
                raise TunekitError(f"phase '{ph}' was interrupted in '{out}'; pass --resume to continue it or "
                                   "--overwrite to restart it")
            need = NEEDS.get(ph)
            if need and run.status(need) != "done" and need not in wanted:
                raise TunekitError(f"phase '{ph}' needs phase '{need}' done first (run --phase {need})")
            console.print(f"[bold]cai: phase {ph}[/bold]")
            started = time.perf_counter()
            info = PHASE_FUNCS[ph](recipe, run, constitution, prompts if ph != "eval" else eval_prompts)
            run.finish(ph, time.perf_counter() - started, **info)
            _write_card(recipe, run, prompts)
    except BaseException:
        restored = run.restore()
        if restored:
            print(f"note: the redo did not finish; '{out}' is back as it was before --overwrite "
                  f"(phases {', '.join(restored)})", file=sys.stderr)
        raise
    run.keep_redo()
    return out


def _write_card(recipe: Recipe, run: CaiRun, prompts: list[Prompt]) -> None:
    import hashlib

    fp = hashlib.sha1("\n".join(p.id for p in prompts).encode()).hexdigest()[:16]
    card = run_card("cai", recipe.train.seed, fp, {"constitution": recipe.cai.constitution or "default",
                                                   "phases": run.state["phases"]})
    (run.path / "run_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- phases


def phase_critique(recipe: Recipe, run: CaiRun, constitution: Constitution, prompts: list[Prompt]) -> dict:
    cfg = recipe.cai
    policy = _load(recipe.model.name)
    critic = _load(cfg.critic_model) if cfg.critic_model else policy
    run.start("critique", recipe)
    (run.path / "constitution.yaml").write_text(constitution.to_yaml(), encoding="utf-8")
    stats = run_critique(
        policy, critic, constitution, prompts, cfg, run.path / "critique.jsonl", seed=recipe.train.seed,
        on_batch=lambda done, total: console.print(f"  critique: {done}/{total} prompts"),
    )
    rows = sft_records(AppendLog(run.path / "critique.jsonl").in_order(p.id for p in prompts))
    if not rows:
        raise TunekitError("phase critique: every revision was filtered (empty, truncated or repeated); "
                           "raise cai.max_new_tokens or use another model")
    tmp = run.path / "sft_data.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(run.path / "sft_data.jsonl")
    s = stats.as_dict()
    console.print(f"  revisions kept {s['kept']}/{s['revisions']} ({100 * s['kept_share']:.0f}%), filtered "
                  f"{s['filtered']}; {s['with_target']} SFT examples")
    return {"stats": s}


def _sub_run(run: CaiRun, name: str, sub: Recipe, fn) -> Path:
    final, work = run.path / name, partial_path(run.path / name)
    if final.is_dir() and (final / "run_card.json").is_file():  # finished, but the state was not saved
        return final
    return fn(sub, overwrite=False, resume=work.is_dir()).path


def phase_sft(recipe: Recipe, run: CaiRun, constitution: Constitution, prompts: list[Prompt]) -> dict:
    from tunekit.stages.sft import run_sft

    sub = sft_recipe(recipe, run.path)
    run.start("sft", recipe)
    path = _sub_run(run, "sft", sub, run_sft)
    card = json.loads((path / "run_card.json").read_text())
    return {"run": path.name, "metrics": card.get("metrics", {})}


def phase_feedback(recipe: Recipe, run: CaiRun, constitution: Constitution, prompts: list[Prompt]) -> dict:
    from tunekit.generation import sample

    cfg = recipe.cai
    policy, tok = _load(str(run.path / "sft"))
    run.start("feedback", recipe)
    pairs = AppendLog(run.path / "pairs.jsonl")
    todo = [p for p in prompts if p.id not in pairs]
    for start in range(0, len(todo), cfg.generation_batch_size):
        batch = todo[start : start + cfg.generation_batch_size]
        ro = sample(policy, tok, [p.messages for p in batch], max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.pair_temperature, top_p=cfg.top_p, num_samples=2,
                    batch_size=2 * cfg.generation_batch_size, seed=recipe.train.seed + len(pairs))
        fin = ro.finished.tolist()
        pairs.append({"id": p.id, "prompt": p.prompt, "responses": ro.texts[2 * i : 2 * i + 2],
                      "finished": fin[2 * i : 2 * i + 2]} for i, p in enumerate(batch))
        console.print(f"  pairs: {len(pairs)}/{len(prompts)} prompts")
    del policy, tok
    gc.collect()
    judge, jtok = _load(cfg.feedback_model or recipe.model.name)
    judged = AppendLog(run.path / "feedback.jsonl")
    todo = [r for r in pairs.in_order(p.id for p in prompts) if r["id"] not in judged]
    by_id = {p.id: p for p in prompts}
    for start in range(0, len(todo), cfg.generation_batch_size):
        batch = todo[start : start + cfg.generation_batch_size]
        distinct = [r for r in batch if r["responses"][0].strip() != r["responses"][1].strip()]
        items = [(r["id"], by_id[r["id"]].messages, *r["responses"]) for r in distinct]
        verdicts = dict(zip((r["id"] for r in distinct), judge_pairs(
            judge, jtok, constitution, items, cfg.principles_per_judgement, recipe.train.seed,
            cfg.generation_batch_size)))
        records = []
        for r in batch:
            if r["id"] not in verdicts:
                records.append({"id": r["id"], "prompt": r["prompt"], "dropped": "identical"})
                continue
            rec = preference_record(r["id"], r["prompt"], *r["responses"], verdicts[r["id"]])
            rec["dropped"] = "low_confidence" if rec["confidence"] < cfg.min_confidence else None
            records.append(rec)
        judged.append(records)
        console.print(f"  judged: {len(judged)}/{len(prompts)} pairs")
    rows = judged.in_order(p.id for p in prompts)
    kept = [r for r in rows if r["dropped"] is None]
    tmp = run.path / "preferences.jsonl.tmp"
    tmp.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "dropped"}, ensure_ascii=False) + "\n"
                           for r in kept), encoding="utf-8")
    tmp.replace(run.path / "preferences.jsonl")
    scores = [s for r in rows if r["dropped"] != "identical" for s in r["scores"]]
    stats = {
        "pairs": len(rows),
        "kept": len(kept),
        "dropped_identical": sum(r["dropped"] == "identical" for r in rows),
        "dropped_low_confidence": sum(r["dropped"] == "low_confidence" for r in rows),
        "mean_confidence": round(sum(r["confidence"] for r in kept) / len(kept), 4) if kept else None,
        # P(the model answers "A") averaged over both orders: 0.5 = no position bias
        "p_label_a": round(sum(s["as_a"] + 1 - s["as_b"] for s in scores) / (2 * len(scores)), 4) if scores else None,
    }
    console.print(f"  preferences kept {stats['kept']}/{stats['pairs']} (identical pairs "
                  f"{stats['dropped_identical']}, low confidence {stats['dropped_low_confidence']})")
    del judge, jtok
    gc.collect()
    if not kept:
        raise TunekitError("phase feedback: no preference pair left (every pair identical or under "
                           "cai.min_confidence); raise cai.pair_temperature or lower cai.min_confidence")
    return {"stats": stats}


def phase_dpo(recipe: Recipe, run: CaiRun, constitution: Constitution, prompts: list[Prompt]) -> dict:
    try:
        from tunekit.stages.dpo import run_dpo
    except ModuleNotFoundError as exc:
        if exc.name != "tunekit.stages.dpo":
            raise
        raise TunekitError("phase dpo needs `tunekit dpo` (tunekit.stages.dpo), which this build lacks") from None
    sub = dpo_recipe(recipe, run.path)
    run.start("dpo", recipe)
    path = _sub_run(run, "dpo", sub, run_dpo)
    card = json.loads((path / "run_card.json").read_text())
    return {"run": path.name, "metrics": card.get("metrics", {})}


def final_model(run: CaiRun) -> Path:
    return run.path / ("dpo" if run.status("dpo") == "done" else "sft")


def phase_eval(recipe: Recipe, run: CaiRun, constitution: Constitution, prompts: list[Prompt]) -> dict:
    """How often the feedback model prefers the final model's greedy answer over the start model's."""
    from tunekit.generation import sample

    cfg = recipe.cai
    final = final_model(run)
    answers: dict[str, list[str]] = {}
    for role, name in (("start", recipe.model.name), ("final", str(final))):
        model, tok = _load(name)
        if role == "start":
            run.start("eval", recipe)
        answers[role] = sample(model, tok, [p.messages for p in prompts], max_new_tokens=cfg.max_new_tokens,
                               temperature=0.0, batch_size=cfg.generation_batch_size).texts
        del model, tok
        gc.collect()
    judge, jtok = _load(cfg.feedback_model or recipe.model.name)
    items = [(p.id, p.messages, f, s) for p, f, s in zip(prompts, answers["final"], answers["start"])]
    verdicts = judge_pairs(judge, jtok, constitution, items, cfg.principles_per_judgement, recipe.train.seed,
                           cfg.generation_batch_size)
    del judge, jtok
    gc.collect()
    rows = []
    for p, (_, _, f, s), v in zip(prompts, items, verdicts):
        identical = f.strip() == s.strip()
        rows.append({"id": p.id, "prompt": p.prompt, "final": f, "start": s,
                     "p_final": 0.5 if identical else round(v.p_first, 6), "identical": identical,
                     "principles": v.principles})
    (run.path / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    p_final = [r["p_final"] for r in rows]
    summary = {
        "prompts": len(rows),
        "final_model": final.name,
        "mean_p_final": round(sum(p_final) / len(p_final), 4),
        "final_preferred": sum(p > 0.5 for p in p_final),
        "start_preferred": sum(p < 0.5 for p in p_final),
        "ties": sum(p == 0.5 for p in p_final),
    }
    (run.path / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"  eval: feedback model prefers the final model on {summary['final_preferred']}/{len(rows)} "
                  f"held-out prompts (mean p {summary['mean_p_final']:.3f}, both orders averaged)")
    return {"stats": summary}


PHASE_FUNCS = {"critique": phase_critique, "sft": phase_sft, "feedback": phase_feedback, "dpo": phase_dpo,
               "eval": phase_eval}

