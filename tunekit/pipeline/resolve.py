"""Turn each stage of a pipeline into exactly what its command would take, and check it before anything runs.

Training stages (sft, rm, dpo, grpo, ppo, cai) become a validated `Recipe`: recipe file (paths relative to it),
then the pipeline's `defaults` (like --set, sections the stage reads), then the stage's inline sections, then
its `set:` keys; `from: X` sets `model.name` to X's output and `output` is OUT/<stage>. `{stage: X}` anywhere
stands for X's artifact path. merge / quantize / eval become their options. Each stage's artifact kind is
known up front, so a `from:` of the wrong kind (quantize from an rm run) is an error before the first stage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.errors import TunekitError
from tunekit.evaluation.command import EvalRequest, check_options, check_rewards
from tunekit.paths import resolve_path, resolve_recipe_paths, resolve_shipped_recipe
from tunekit.pipeline.spec import COMMAND_KEYS, EVAL_MODEL_KEYS, TRAINING_COMMANDS, PipelineSpec, StageSpec

#: what each command's output is, for checking `from:` and references
KIND = {**{c: "policy" for c in TRAINING_COMMANDS if c != "rm"},
        "rm": "reward model", "merge": "model", "quantize": "quantized model", "eval": "evaluation"}
#: which kinds each command accepts as `from:`
ACCEPTS = {**{c: ("policy", "model") for c in TRAINING_COMMANDS if c != "rm"},
           "rm": ("policy", "model", "reward model"), "merge": ("policy",), "quantize": ("policy", "model"),
           "eval": ()}
QUANT_FORMATS = ("gguf", "gptq", "awq", "bnb")


@dataclass
class Resolved:
    """A stage ready to run: its command's input (recipe or options), its artifact, and what it reads."""

    name: str
    command: str
    folder: Path  # OUT/<stage>: what the stage writes (and the output-altered manifest covers)
    artifact: Path  # what `from:` / `{stage: X}` of a later stage points at
    recipe: Any = None  # tunekit Recipe (training stages)
    options: dict[str, Any] = field(default_factory=dict)  # merge / quantize / eval
    needs: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # local files/folders read (not stage outputs)
    labels: dict[str, str] = field(default_factory=dict)  # eval: `against:` / `judge:` as written (not hashed)

    def describe(self) -> dict[str, Any]:
        """The resolved input as plain data (what the fingerprint hashes)."""
        if self.recipe is not None:
            data = self.recipe.model_dump(mode="json", exclude=self.recipe.foreign_sections() | {"output"})
        else:
            data = dict(self.options)
        return {"command": self.command, "input": data}


def artifact_of(spec: PipelineSpec, name: str) -> Path:
    """Where stage `name`'s artifact will be (a run directory, model folder, GGUF file or result folder)."""
    st = spec.stages[name]
    folder = spec.output / name
    if st.command == "cai":
        return folder / "dpo"
    if st.command == "quantize" and str(st.body.get("format", "gguf")).lower() == "gguf":
        qtype = str(st.body.get("type") or "Q8_0").upper()
        return folder / f"model-{qtype}.gguf"
    if st.command == "quantize":
        return folder / "model"
    return folder


def _substitute(value: Any, spec: PipelineSpec) -> Any:
    """`{stage: X}` → X's artifact path, everywhere inside `value`."""
    if isinstance(value, dict):
        if set(value) == {"stage"} and isinstance(value["stage"], str):
            return str(artifact_of(spec, value["stage"]))
        return {k: _substitute(v, spec) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, spec) for v in value]
    return value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_kind(spec: PipelineSpec, st: StageSpec, other: str, accepts: tuple[str, ...], what: str,
                key: str | None) -> None:
    kind = KIND[spec.stages[other].command]
    if kind not in accepts:
        raise spec.fail(st.name, f"{what} '{other}' is a {spec.stages[other].command} stage (its output is a "
                        f"{kind}); `{st.command}` needs a {' or '.join(accepts)}", key)


def resolve_pipeline(spec: PipelineSpec) -> dict[str, Resolved]:
    """Resolve and validate every stage (in order); the first problem is raised with the pipeline's file:line."""
    return {name: resolve_stage(spec, spec.stages[name]) for name in spec.order}


def resolve_stage(spec: PipelineSpec, st: StageSpec) -> Resolved:
    if st.source is not None and st.command != "eval":
        _check_kind(spec, st, st.source, ACCEPTS[st.command], "from:", "from")
    elif st.source is not None:
        raise spec.fail(st.name, "`from:` has no meaning for eval; list the stages under `targets:`", "from")
    if st.command in TRAINING_COMMANDS:
        return _training(spec, st)
    return {"merge": _merge_stage, "quantize": _quantize_stage, "eval": _eval_stage}[st.command](spec, st)


# ------------------------------------------------------------------------------------------------ training
def _training(spec: PipelineSpec, st: StageSpec) -> Resolved:
    from tunekit.config.load import _apply_override, read_yaml, validate
    from tunekit.config.schema import foreign_sections

    base_dir = spec.path.parent
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = str(spec.path)
    recipe_file = st.body.get("recipe")
    if recipe_file is not None:
        if not isinstance(recipe_file, str):
            raise spec.fail(st.name, "`recipe:` is a path to a recipe file", "recipe")
        path = Path(resolve_path(recipe_file, base_dir))
        path = resolve_shipped_recipe(path) if not path.exists() else path
        if not path.is_file():
            raise spec.fail(st.name, f"recipe '{recipe_file}' not found", "recipe")
        data, lines = read_yaml(path)
        declared = data.get("stage")
        if declared is not None and declared != st.command:
            raise spec.fail(st.name, f"{path}:{lines.get('stage')}: this recipe is for stage '{declared}', not "
                            f"'{st.command}'", "recipe")
        data = resolve_recipe_paths(data, path.parent)
        source = str(path)
    foreign = foreign_sections(st.command)
    defaults = {k: v for k, v in resolve_recipe_paths(spec.defaults, base_dir).items() if k not in foreign}
    data = _merge(data, defaults)
    inline = {k: v for k, v in st.body.items() if k not in ("recipe", "set")}
    if "stage" in inline or "output" in inline:
        key = "stage" if "stage" in inline else "output"
        raise spec.fail(st.name, f"`{key}:` is set by the pipeline (the command, and OUT/<stage>)", key)
    data = _merge(data, resolve_recipe_paths(inline, base_dir))
    data = _substitute(data, spec)
    if st.source is not None:
        data.setdefault("model", {})
        data["model"] = {**data["model"], "name": str(artifact_of(spec, st.source))}
    data["stage"] = st.command
    data["output"] = str(spec.output / st.name)
    overrides = st.body.get("set") or {}
    if not isinstance(overrides, dict):
        raise spec.fail(st.name, "`set:` maps recipe keys to values, e.g. set: {dpo.beta: 0.1}", "set")
    for key, value in overrides.items():
        value = _substitute(value, spec)
        if isinstance(value, str) and str(key).split(".")[-1] in ("name", "train", "eval", "path", "chat_template"):
            value = resolve_path(value, base_dir)
        try:
            _apply_override(data, str(key), value)
        except TunekitError as exc:
            raise spec.fail(st.name, str(exc).removeprefix("--set "), f"set.{key}") from None
    # keys written inline in the pipeline are named with the pipeline's line; recipe keys with the recipe's
    if recipe_file is None:
        lines = {k: v for k, v in st.lines.items() if not k.startswith("set")}
    try:
        recipe = validate(data, source, lines)
    except TunekitError as exc:
        raise _in_stage(spec, st, str(exc)) from None
    res = Resolved(st.name, st.command, spec.output / st.name, artifact_of(spec, st.name), recipe=recipe,
                   needs=list(st.needs))
    _check_training_inputs(spec, st, res)
    return res


def _in_stage(spec: PipelineSpec, st: StageSpec, message: str) -> TunekitError:
    """`pipeline.yaml:14: stage 'x': ...` from a message that may already start with the pipeline's file:line."""
    prefix = f"{spec.path}:"
    if message.startswith(prefix):
        line, _, rest = message[len(prefix):].partition(": ")
        if line.isdigit():
            return TunekitError(f"{spec.path}:{line}: stage '{st.name}': {rest}")
        message = message[len(prefix):].lstrip()
    return spec.fail(st.name, message)


def _stage_paths(spec: PipelineSpec) -> dict[str, str]:
    return {str(artifact_of(spec, n)): n for n in spec.stages}


def _check_training_inputs(spec: PipelineSpec, st: StageSpec, res: Resolved) -> None:
    """Data files exist and parse; a local model exists; references name the right kind of stage."""
    from tunekit.data.sources import iter_source
    from tunekit.errors import reading

    recipe = res.recipe
    stages = _stage_paths(spec)
    model = recipe.model.name
    if model in stages:
        _check_kind(spec, st, stages[model], ACCEPTS[st.command], "model.name: stage", None)
    elif _looks_local(model) and not Path(model).expanduser().exists():
        raise spec.fail(st.name, f"model.name: '{model}' not found (not a folder, and a path is never sent to "
                        "the hub)")
    elif Path(model).expanduser().exists():
        res.inputs.append(model)
    for reward in recipe.rewards:
        path = reward.params.get("path")
        if isinstance(path, str) and path in stages:
            _check_kind(spec, st, stages[path], ("reward model",), f"reward {reward.name}: path: stage", None)
        elif isinstance(path, str) and Path(path).exists():
            res.inputs.append(path)
    for split in ("train", "eval"):
        value = getattr(recipe.data, split)
        sources = [value] if isinstance(value, str) else [s.path for s in value or []]
        for path in sources:
            if path in stages:
                continue
            p = Path(path).expanduser()
            if p.exists():
                res.inputs.append(path)
                try:
                    with reading(p):
                        for _ in iter_source(path):
                            pass
                except TunekitError as exc:
                    raise spec.fail(st.name, f"data.{split}: {exc}") from None
            elif _looks_local(path):
                raise spec.fail(st.name, f"data.{split}: data file '{path}' not found")
    for key in ("chat_template",):
        value = getattr(recipe.model, key)
        if isinstance(value, str) and value.endswith(".jinja"):
            if not Path(value).expanduser().is_file():
                raise spec.fail(st.name, f"model.chat_template: '{value}' not found")
            res.inputs.append(value)
    if st.command == "cai":
        for key in ("constitution", "prompts", "eval_prompts"):
            value = getattr(recipe.cai, key)
            if isinstance(value, str) and value != "heldout":
                if not Path(value).expanduser().is_file():
                    raise spec.fail(st.name, f"cai.{key}: '{value}' not found")
                res.inputs.append(value)


def _looks_local(name: str) -> bool:
    """A name that can only mean a path: starts with `.`, `/` or `~`, or ends in a file suffix."""
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in (
        ".jsonl", ".json", ".csv", ".parquet", ".txt", ".yaml", ".yml", ".gguf", ".safetensors")


# ------------------------------------------------------------------------------------------------ others
def _options(spec: PipelineSpec, st: StageSpec) -> dict[str, Any]:
    valid = COMMAND_KEYS[st.command]
    body = dict(st.body)
    if "recipe" in body:
        raise spec.fail(st.name, f"`recipe:` is for training stages; {st.command} takes its options here "
                        f"({', '.join(valid)})", "recipe")
    extra = body.pop("set", None) or {}
    if not isinstance(extra, dict):
        raise spec.fail(st.name, "`set:` maps options to values", "set")
    body.update(extra)
    for key in body:
        if key not in valid:
            import difflib

            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise spec.fail(st.name, f"unknown key '{key}'{hint}; {st.command} takes: {', '.join(valid)}", key)
    return _substitute(body, spec)


def _existing(spec: PipelineSpec, st: StageSpec, key: str, value: Any, res: Resolved) -> str | None:
    """A path option: resolved against the pipeline's folder, must exist (unless it is a stage's output)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise spec.fail(st.name, f"{key}: expected a path", key)
    path = resolve_path(value, spec.path.parent)
    if path in _stage_paths(spec):
        return path
    if not Path(path).expanduser().exists():
        raise spec.fail(st.name, f"{key}: '{value}' not found", key)
    res.inputs.append(path)
    return path


def _merge_stage(spec: PipelineSpec, st: StageSpec) -> Resolved:
    from tunekit.merge.config import load_config

    opts = _options(spec, st)
    res = Resolved(st.name, "merge", spec.output / st.name, spec.output / st.name, needs=list(st.needs))
    config = opts.get("config")
    if config is not None and st.source is not None:
        raise spec.fail(st.name, "give either `from:` (fold that stage's adapter) or `config:` (a merge config)",
                        "config")
    if config is None and st.source is None:
        raise spec.fail(st.name, "merge needs `from: STAGE` (fold its adapter) or `config:` (a mergekit-style "
                        "config, a file or inline)")
    if isinstance(config, dict):
        import tempfile

        import yaml

        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as fh:
            yaml.safe_dump(config, fh)
        try:
            load_config(fh.name)
        except TunekitError as exc:
            raise spec.fail(st.name, f"config: {exc}", "config") from None
        finally:
            Path(fh.name).unlink()
    elif config is not None:
        opts["config"] = path = _existing(spec, st, "config", config, res)
        try:
            load_config(path)
        except TunekitError as exc:
            raise spec.fail(st.name, f"config: {exc}", "config") from None
    if st.source is not None:
        if spec.stages[st.source].command in ("merge",):
            raise spec.fail(st.name, f"from: '{st.source}' is already a full model; nothing to fold", "from")
        opts["adapter"] = str(artifact_of(spec, st.source))
    if opts.get("base") is not None:
        base = opts["base"]
        opts["base"] = resolve_path(base, spec.path.parent) if isinstance(base, str) else base
    if opts.get("dtype") not in (None, "float32", "float16", "bfloat16"):
        raise spec.fail(st.name, f"dtype: '{opts['dtype']}' is not one of float32, float16, bfloat16", "dtype")
    res.options = opts
    return res


def _quantize_stage(spec: PipelineSpec, st: StageSpec) -> Resolved:
    from tunekit.quantize.api import normalize_type

    opts = _options(spec, st)
    if st.source is None:
        raise spec.fail(st.name, "quantize needs `from: STAGE` (a training or merge stage)")
    fmt = str(opts.get("format", "gguf")).lower()
    if fmt not in QUANT_FORMATS:
        raise spec.fail(st.name, f"format: '{fmt}' is not one of {', '.join(QUANT_FORMATS)}", "format")
    try:
        qtype = normalize_type(fmt, opts.get("type"))
    except TunekitError as exc:
        raise spec.fail(st.name, f"type: {exc}", "type") from None
    if fmt == "gguf":
        from tunekit.quantize.gguf_writer import DIRECT_TYPES

        if qtype not in DIRECT_TYPES or opts.get("verify"):  # K-quants and --verify load llama.cpp
            from tunekit.quantize.llamacpp import require_llama_cpp

            try:
                require_llama_cpp()
            except TunekitError as exc:
                raise spec.fail(st.name, f"type {qtype}{' with verify' if opts.get('verify') else ''}: {exc}",
                                "type") from None
    res = Resolved(st.name, "quantize", spec.output / st.name, artifact_of(spec, st.name), needs=list(st.needs))
    for key in ("eval_text", "calibration"):
        if opts.get(key) not in (None, "builtin"):
            opts[key] = _existing(spec, st, key, opts[key], res)
    for key in ("samples", "group_size"):
        if key in opts and (not isinstance(opts[key], int) or opts[key] < 1):
            raise spec.fail(st.name, f"{key}: must be a positive whole number", key)
    if "verify" in opts and not isinstance(opts["verify"], bool):
        raise spec.fail(st.name, "verify: true or false", "verify")
    opts.update(format=fmt, type=qtype, source=str(artifact_of(spec, st.source)))
    res.options = opts
    return res


def _eval_stage(spec: PipelineSpec, st: StageSpec) -> Resolved:
    """The options of `tunekit eval`, one request per target: checked here as the command checks them
    (`check_options`, task names, judge questions, rewards) with the pipeline's file:line and key."""
    opts = _options(spec, st)
    res = Resolved(st.name, "eval", spec.output / st.name, spec.output / st.name, needs=list(st.needs))
    targets = opts.get("targets")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not isinstance(targets, list):
        raise spec.fail(st.name, "eval needs `targets:` (stage names, run directories or model names)", "targets")
    _check_eval_values(spec, st, opts)
    try:
        check_options(eval_request(opts, "target"))
    except TunekitError as exc:
        raise _option_error(spec, st, exc) from None
    resolved_targets: dict[str, str] = {}
    for target in targets:
        resolved_targets[target] = _eval_model(spec, st, "targets", target, res)
    opts["targets"] = resolved_targets
    for key in EVAL_MODEL_KEYS:
        if opts.get(key) is not None:
            res.labels[key] = opts[key]
            opts[key] = _eval_model(spec, st, key, opts[key], res)
    if opts.get("data") is not None:
        opts["data"] = _existing(spec, st, "data", opts["data"], res)
        if opts["data"] not in _stage_paths(spec):
            from tunekit.data.sources import iter_source
            from tunekit.errors import reading

            try:
                with reading(opts["data"]):
                    if not any(True for _ in iter_source(opts["data"])):
                        raise TunekitError(f"{opts['data']}: no records to evaluate")
            except TunekitError as exc:
                raise spec.fail(st.name, f"data: {exc}", "data") from None
    if opts.get("tasks") is not None:
        opts["tasks"] = _eval_tasks(spec, st, opts["tasks"], res)
    template = opts.get("judge_template")
    if template is not None:
        from tunekit.evaluation.judge import TEMPLATES, judge_questions

        if template not in (*TEMPLATES, "constitution"):
            opts["judge_template"] = _existing(spec, st, "judge_template", template, res)
        try:
            judge_questions(opts["judge_template"])
        except TunekitError as exc:
            raise _option_error(spec, st, exc) from None
    reward = opts.get("reward")
    if isinstance(reward, str):
        opts["reward"] = reward = [reward]
    try:
        check_rewards(reward or [])
    except TunekitError as exc:
        raise _option_error(spec, st, exc) from None
    res.options = opts
    return res


def _check_eval_values(spec: PipelineSpec, st: StageSpec, opts: dict[str, Any]) -> None:
    """Each eval key's type and range (the ranges of `tunekit eval`'s options)."""
    for key, low in (("limit", 1), ("max_length", 8), ("max_new_tokens", 1), ("batch_size", 1),
                     ("num_fewshot", 0)):
        value = opts.get(key)
        if key in opts and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            what = "a positive whole number" if low == 1 else f"a whole number, at least {low}"
            raise spec.fail(st.name, f"{key}: must be {what}", key)
    for key in ("generate", "apply_chat_template", "trust_remote_code"):
        if key in opts and not isinstance(opts[key], bool):
            raise spec.fail(st.name, f"{key}: true or false", key)
    for key in ("base", "judge_template"):
        if opts.get(key) is not None and (not isinstance(opts[key], str) or not opts[key]):
            raise spec.fail(st.name, f"{key}: expected a {'path or name' if key == 'base' else 'name or path'}",
                            key)
    for key, what in (("tasks", "task names (comma-separated or a list), task YAML files or folders of them"),
                      ("reward", "a reward name or a list of them, e.g. reward: math_answer")):
        value = opts.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise spec.fail(st.name, f"{key}: {what}", key)
    if opts.get("generate") is False and "max_new_tokens" in opts:
        raise spec.fail(st.name, "max_new_tokens: no effect with `generate: false`", "max_new_tokens")


def eval_request(options: dict[str, Any], target: str, output: Path | None = None) -> EvalRequest:
    """The `tunekit eval` request of one target of an eval stage (its options as resolved)."""
    tasks = options.get("tasks")
    return EvalRequest(
        target=target, data=options.get("data"), tasks=",".join(tasks) if isinstance(tasks, list) else tasks,
        against=options.get("against"), judge=options.get("judge"), judge_template=options.get("judge_template"),
        num_fewshot=options.get("num_fewshot"), apply_chat_template=options.get("apply_chat_template", False),
        base=options.get("base"), max_length=options.get("max_length", 1024),
        max_new_tokens=options.get("max_new_tokens", 64), limit=options.get("limit"),
        batch_size=options.get("batch_size", 8), generate=options.get("generate", True),
        rewards=list(options.get("reward") or []), output=output, overwrite=output is not None,
        trust_remote_code=options.get("trust_remote_code", False))


def _option_error(spec: PipelineSpec, st: StageSpec, exc: TunekitError) -> TunekitError:
    """A `tunekit eval` message in the pipeline's words (`--judge-template` → `judge_template`), with the line
    of the key it is about."""
    import re

    text = str(exc)
    first = re.match(r"--([a-z-]+)", text)
    key = None if first is None else "generate" if first.group(1) == "no-generate" else first.group(1).replace("-", "_")
    text = text.replace("--no-generate", "`generate: false`")
    text = re.sub(r"^--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), text)
    text = re.sub(r"--([a-z-]+)(?: [A-Z]+\b)?", lambda m: f"`{m.group(1).replace('-', '_')}:`", text)
    return spec.fail(st.name, text, key)


def _eval_model(spec: PipelineSpec, st: StageSpec, key: str, value: Any, res: Resolved) -> str:
    """A model an eval stage names (a target, `against:`, `judge:`): a stage's output, a path or a model name."""
    if not isinstance(value, str) or not value:
        raise spec.fail(st.name, f"{key}: {value!r} is not a stage name or path", key)
    if value in spec.stages:
        command = spec.stages[value].command
        kind = KIND[command]
        if key == "judge" and kind in ("quantized model", "evaluation", "reward model"):
            raise spec.fail(st.name, f"judge: '{value}' is a {command} stage; the judge is a language model (a "
                            "policy run, a merged model or a model folder)", key)
        if kind in ("quantized model", "evaluation"):
            raise spec.fail(st.name, f"{key}: '{value}' is a {command} stage; eval loads runs, adapters and model "
                            "folders (a quantize stage reports its own perplexity with `verify: true`)", key)
        return str(artifact_of(spec, value))
    path = resolve_path(value, spec.path.parent)
    if path in _stage_paths(spec):  # a `{stage: X}` reference
        return path
    if Path(path).expanduser().exists():
        res.inputs.append(path)
    elif _looks_local(value) or ("/" not in value and not _known_alias(value)):
        import difflib

        close = difflib.get_close_matches(value, list(spec.stages), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise spec.fail(st.name, f"{key}: '{value}' is neither a stage, a path nor a model alias{hint}", key)
    return path


def _eval_tasks(spec: PipelineSpec, st: StageSpec, value: Any, res: Resolved) -> list[str]:
    """`tasks:` (comma-separated or a list: lm_eval names, task YAML files, folders of them) checked as
    `tunekit eval --tasks` checks it; local task files resolve against the pipeline's folder and are inputs."""
    from tunekit.evaluation.harness import select_tasks

    items = [value] if isinstance(value, str) else value
    names = [part.strip() for item in items for part in item.split(",") if part.strip()]
    tasks = []
    for name in names:
        path = resolve_path(name, spec.path.parent)
        local = Path(path).expanduser()
        if local.is_dir() or local.suffix in (".yaml", ".yml"):
            if local.exists():
                res.inputs.append(path)
            tasks.append(path)
        else:
            tasks.append(name)
    try:
        select_tasks(tasks)
    except TunekitError as exc:
        raise _option_error(spec, st, exc) from None
    return tasks


def _known_alias(name: str) -> bool:
    try:
        from tunekit.models.embedded import ALIASES  # type: ignore[attr-defined]
    except ImportError:
        return name == "smollm2-135m"
    return name in ALIASES
