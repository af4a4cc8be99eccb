"""Load a recipe: YAML file → `--set` overrides → validated `Recipe`, or one line naming the bad key.

Errors carry the YAML line of the offending key (`recipe.yaml:12: ...`) and a "did you mean" for typos.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunekit.config.schema import Recipe, foreign_section_message, foreign_sections
from tunekit.config.stages import STAGE_SECTIONS
from tunekit.errors import TunekitError, reading

#: Most nodes a YAML document may expand to through its aliases (a recipe has a few hundred): more is an
#: alias bomb ("billion laughs"), refused before anything walks it.
MAX_YAML_NODES = 100_000


class SafeYamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses recursive aliases, alias bombs and non-finite numbers (`.nan`, `.inf`,
    `1e999`). Every YAML file tunekit reads from a user (recipes, `--set` values, merge configs, run recipes)
    goes through `safe_yaml()`."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if isinstance(event, yaml.AliasEvent):
            if anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"recursive alias *{anchor} (it refers to a node that contains it)", event.start_mark
                )
            return super().compose_node(parent, index)
        if anchor is None or isinstance(event, yaml.ScalarEvent):
            return super().compose_node(parent, index)
        self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.discard(anchor)


def _finite_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    import math

    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    if not math.isfinite(value):
        raise yaml.constructor.ConstructorError(
            None, None, f"'{node.value}' is not a finite number (nan and inf are refused)", node.start_mark
        )
    return value


SafeYamlLoader.add_constructor("tag:yaml.org,2002:float", _finite_float)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (memoised per node: linear time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # placeholder (recursion is refused while composing)
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[key] = min(size, MAX_YAML_NODES + 1)
    return memo[key]


def safe_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document with SafeYamlLoader; (data, root node). Raises yaml.YAMLError."""
    loader = SafeYamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand to more than {MAX_YAML_NODES:,} nodes (an alias bomb?)", node.start_mark
            )
        return loader.construct_document(node), node
    finally:
        loader.dispose()


def yaml_error(path: str | Path, exc: yaml.YAMLError) -> TunekitError:
    """`<path>:<line>: invalid YAML: <problem>`."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return TunekitError(f"{where}: invalid YAML: {problem}")


def read_yaml_file(path: str | Path, what: str = "file") -> Any:
    """Read a user's YAML file safely (see SafeYamlLoader); a TunekitError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TunekitError(f"{what} '{path}' not found")
    with reading(path):
        text = path.read_text(encoding="utf-8")
    try:
        return safe_yaml(text)[0]
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None


def _field_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X`, `X | None`, `list[X]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _field_model(arg)
        if found is not None:
            return found
    return None


def all_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. `adapter.r`, `data.train.weight`."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{field.alias or name}"  # the YAML key (`orpo.lambda`, `distill.lambda`: field lambda_)
        keys.append(dotted)
        sub = _field_model(field.annotation)
        if sub is not None:
            keys.extend(all_keys(sub, dotted + "."))
    return keys


def suggest(key: str, valid: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest valid key, or ``."""
    valid = list(valid)
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not match:
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        leaf_match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        match = [by_leaf[leaf_match[0]]] if leaf_match else []
    return f" (did you mean '{match[0]}'?)" if match else ""


def key_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    """Fill `lines` with dotted key (`a.b.0.c`) → line number of a composed YAML node."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            lines[dotted] = key_node.start_mark.line + 1
            key_lines(value_node, dotted + ".", lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix}{i}"] = item.start_mark.line + 1
            key_lines(item, f"{prefix}{i}.", lines)


def yaml_with_lines(path: Path, what: str) -> tuple[Any, dict[str, int]]:
    """A YAML file's data and its dotted key → line number; `what` names the file in errors ("recipe")."""
    if not path.is_file():
        raise TunekitError(f"{what} '{path}' not found")
    with reading(path):
        text = path.read_text(encoding="utf-8")
    try:
        data, node = safe_yaml(text)
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None
    lines: dict[str, int] = {}
    if node is not None:
        key_lines(node, "", lines)
    return data, lines


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping; also return dotted key → line number."""
    path = Path(path)
    data, lines = yaml_with_lines(path, "recipe")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TunekitError(f"{path}: a recipe must be a mapping of sections (model, data, adapter, train, ...)")
    return data, lines


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings → (key, YAML-parsed value). `x=[a, b]`, `x=true`, `x=1e-4` work as in YAML."""
    out = []
    for item in items:
        if "=" not in item:
            raise TunekitError(f"--set '{item}': expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = safe_yaml(raw)[0] if raw.strip() else None
        except yaml.constructor.ConstructorError as exc:
            raise TunekitError(f"--set {key}: {exc.problem}") from None
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    valid = all_keys()
    # a key is valid if it is a schema key, or an index into a list of sources (data.train.0.weight)
    generic = ".".join(p for p in key.split(".") if not p.isdigit())
    if generic not in valid:
        raise TunekitError(f"--set {key}: unknown key{suggest(generic, valid)}")
    parts = key.split(".")
    node: Any = data

    def checked_index(i: int) -> int:
        """parts[i] as an index into the list `node`; a name, or an index past the end, is the user's error."""
        where = ".".join(parts[:i])
        if not parts[i].isdigit():
            raise TunekitError(f"--set {key}: '{where}' is a list; index it with a number ({where}.0...)")
        if int(parts[i]) > len(node) or (int(parts[i]) == len(node) and i < len(parts) - 1):
            raise TunekitError(f"--set {key}: '{where}' has {len(node)} entr{'y' if len(node) == 1 else 'ies'}; "
                               f"index {parts[i]} is out of range")
        return int(parts[i])

    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[checked_index(i)]
            if not isinstance(node, (dict, list)):
                raise TunekitError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            continue
        nxt = node.get(part)
        if parts[i + 1].isdigit() and nxt is not None and not isinstance(nxt, list):
            raise TunekitError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a list, so it has no entry "
                               f"{parts[i + 1]} (set it as a list first, e.g. --set '{'.'.join(parts[: i + 1])}"
                               "=[{path: a.jsonl}]')")
        if nxt is None:
            nxt = [] if parts[i + 1].isdigit() else {}
            node[part] = nxt
        elif not isinstance(nxt, (dict, list)):
            raise TunekitError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        index = checked_index(len(parts) - 1)
        if index == len(node):
            node.append(value)  # one past the end adds an entry
        else:
            node[index] = value
    else:
        node[last] = value


def _loc_to_key(loc: tuple[Any, ...]) -> str:
    # pydantic adds union member tags (e.g. 'list[DataSource]', 'str') to locations; drop them.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float")))]
    return ".".join(parts)


def validate(data: Mapping[str, Any], source: str = "recipe", lines: Mapping[str, int] | None = None) -> Recipe:
    """Validate a recipe mapping; raise TunekitError naming the first bad key (with its line)."""
    lines = lines or {}
    stage = data.get("stage", "sft")
    if isinstance(stage, str) and stage in STAGE_SECTIONS:
        for name in sorted(foreign_sections(stage) & set(data)):
            line = lines.get(name)
            raise TunekitError(f"{source}:{line}: {foreign_section_message(name, stage)}" if line
                               else f"{source}: {foreign_section_message(name, stage)}")
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as exc:
        # For unions (data.train: str | list[...]) pydantic reports every branch; the deepest one is meant.
        errors = sorted(exc.errors(), key=lambda e: (e["type"] != "extra_forbidden", -len(e["loc"])))
        err = errors[0]
        key = _loc_to_key(err["loc"])
        line = lines.get(key)
        where = f"{source}:{line}" if line else source
        if err["type"] == "extra_forbidden":
            generic = ".".join(p for p in key.split(".") if not p.isdigit())
            raise TunekitError(f"{where}: unknown key '{key}'{suggest(generic, all_keys())}") from None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error":  # our validators name their key: `adapter.r: no effect ...`
            msg = str(err.get("ctx", {}).get("error", msg))
            named = msg.split(":", 1)[0].split(",")[0].strip()
            if named in all_keys() or named in lines:
                line = lines.get(named, line)
                where = f"{source}:{line}" if line else source
                raise TunekitError(f"{where}: {msg}") from None
        elif err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        if not key:
            raise TunekitError(f"{where}: {msg}") from None
        raise TunekitError(f"{where}: key '{key}': {msg}") from None


def load_recipe(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> Recipe:
    """Read `path` (optional), apply `--set` overrides, validate. `defaults` seeds keys the file does not set.
    Paths in the file resolve against its folder, `tunekit/assets/...` to the package's assets (tunekit.paths)."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "recipe"
    if defaults:
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
    if path is not None:
        from tunekit.paths import resolve_recipe_paths

        file_data, lines = read_yaml(path)
        file_data = resolve_recipe_paths(file_data, Path(path).parent)  # relative to the recipe, from anywhere
        source = str(path)
        for k, v in file_data.items():
            if isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
    for key, value in parse_overrides(overrides):
        _apply_override(data, key, value)
        lines.pop(key, None)
    return validate(data, source, lines)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every key its stage reads, defaults included)."""
    data = recipe.model_dump(mode="json", by_alias=True, exclude=recipe.foreign_sections())
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
