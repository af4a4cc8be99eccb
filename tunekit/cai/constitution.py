"""A constitution: the written principles that replace human labels in Constitutional AI (Bai et al., 2022).

YAML format (docs/cai.md):

    name: my-constitution            # optional
    principles:
      - id: harmless                 # unique, [a-z0-9_-]
        critique: "Identify ways in which the assistant's last response is harmful ..."
        revision: "Rewrite the response to remove harmful content while staying helpful."
        comparison: "Which response is less harmful while still helpful?"
        examples:                    # optional few-shot demonstrations of one critique/revision round
          - {prompt: ..., response: ..., critique: ..., revision: ...}

A malformed file is one line naming the file, the line and the principle:
`error: c.yaml:14: principle 'harmless': missing key 'revision'`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tunekit.errors import TunekitError

DEFAULT_CONSTITUTION = "default_constitution.yaml"
PRINCIPLE_KEYS = ("id", "critique", "revision", "comparison", "examples")
EXAMPLE_KEYS = ("prompt", "response", "critique", "revision")
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    comparison: str
    examples: tuple[Example, ...] = ()


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    source: str = field(default="", compare=False)

    def by_id(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise KeyError(pid)

    def to_yaml(self) -> str:
        data = {
            "name": self.name,
            "principles": [
                {
                    "id": p.id,
                    "critique": p.critique,
                    "revision": p.revision,
                    "comparison": p.comparison,
                    **({"examples": [e.__dict__ for e in p.examples]} if p.examples else {}),
                }
                for p in self.principles
            ],
        }
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)


def default_path() -> Path:
    return Path(str(resources.files("tunekit") / "assets" / "cai" / DEFAULT_CONSTITUTION))


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and validate a constitution file (None = the shipped default)."""
    path = Path(path).expanduser() if path is not None else default_path()
    if not path.is_file():
        raise TunekitError(f"constitution '{path}' not found")
    return parse_constitution(path.read_text(encoding="utf-8"), str(path))


def _line(node: yaml.Node | None) -> int:
    return node.start_mark.line + 1 if node is not None else 1


def _mapping(node: yaml.Node) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    return {k.value: (k, v) for k, v in node.value} if isinstance(node, yaml.MappingNode) else {}


def _text(node: yaml.Node, value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TunekitError(f"{where}:{_line(node)}: {what} must be a non-empty string")
    return value.strip()


def parse_constitution(text: str, source: str = "constitution") -> Constitution:
    """Validate YAML text; every error names `source`, the line and the principle."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise TunekitError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise TunekitError(f"{source}:1: a constitution is a mapping with a 'principles' list")
    top = _mapping(root)
    for key in data:
        if key not in ("name", "principles"):
            raise TunekitError(f"{source}:{_line(top[key][0])}: unknown key '{key}' (expected name, principles)")
    if "principles" not in data:
        raise TunekitError(f"{source}:1: missing key 'principles'")
    plist_node = top["principles"][1]
    plist = data["principles"]
    if not isinstance(plist, list) or not plist:
        raise TunekitError(f"{source}:{_line(plist_node)}: 'principles' must be a non-empty list")
    name = data.get("name") or Path(source).stem
    if not isinstance(name, str):
        raise TunekitError(f"{source}:{_line(top['name'][1])}: 'name' must be a string")
    principles: list[Principle] = []
    seen: dict[str, int] = {}
    for i, (raw, node) in enumerate(zip(plist, plist_node.value)):
        principles.append(_principle(raw, node, i, source, seen))
    return Constitution(name=name, principles=tuple(principles), source=source)


def _principle(raw: Any, node: yaml.Node, index: int, source: str, seen: dict[str, int]) -> Principle:
    label = f"principle #{index + 1}"
    if not isinstance(raw, dict):
        raise TunekitError(f"{source}:{_line(node)}: {label}: must be a mapping with {', '.join(PRINCIPLE_KEYS[:4])}")
    keys = _mapping(node)
    pid = raw.get("id")
    if isinstance(pid, str) and pid:
        label = f"principle '{pid}'"
    for key in raw:
        if key not in PRINCIPLE_KEYS:
            raise TunekitError(
                f"{source}:{_line(keys[key][0])}: {label}: unknown key '{key}' (expected {', '.join(PRINCIPLE_KEYS)})"
            )
    for key in PRINCIPLE_KEYS[:4]:
        if key not in raw or raw[key] is None:
            raise TunekitError(f"{source}:{_line(node)}: {label}: missing key '{key}'")
    where = f"{source}"
    if not isinstance(pid, str) or not _ID.match(pid):
        raise TunekitError(f"{where}:{_line(keys['id'][1])}: {label}: id must match [a-z0-9][a-z0-9_-]*, got {pid!r}")
    if pid in seen:
        raise TunekitError(f"{where}:{_line(keys['id'][1])}: {label}: duplicate id (first on line {seen[pid]})")
    seen[pid] = _line(keys["id"][1])
    texts = {k: _text(keys[k][1], raw[k], where, f"{label}: '{k}'") for k in ("critique", "revision", "comparison")}
    examples: list[Example] = []
    if raw.get("examples") is not None:
        ex_node = keys["examples"][1]
        if not isinstance(raw["examples"], list):
            raise TunekitError(f"{where}:{_line(ex_node)}: {label}: 'examples' must be a list")
        for j, (ex, enode) in enumerate(zip(raw["examples"], ex_node.value)):
            if not isinstance(ex, dict):
                raise TunekitError(f"{where}:{_line(enode)}: {label}: example {j + 1} must be a mapping")
            ekeys = _mapping(enode)
            for key in ex:
                if key not in EXAMPLE_KEYS:
                    raise TunekitError(
                        f"{where}:{_line(ekeys[key][0])}: {label}: example {j + 1}: unknown key '{key}' "
                        f"(expected {', '.join(EXAMPLE_KEYS)})"
                    )
            for key in EXAMPLE_KEYS:
                if key not in ex:
                    raise TunekitError(f"{where}:{_line(enode)}: {label}: example {j + 1}: missing key '{key}'")
            fields = {k: _text(ekeys[k][1], ex[k], where, f"{label}: example {j + 1}: '{k}'") for k in EXAMPLE_KEYS}
            examples.append(Example(**fields))
    return Principle(id=pid, examples=tuple(examples), **texts)
