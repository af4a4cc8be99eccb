"""The README stays honest: it starts with the two commands, documents every recipe key and every command."""

from __future__ import annotations

import re

from tests.helpers import ROOT, run_cli
from tunekit.config.load import all_keys


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    text = _readme()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_documents_every_recipe_key():
    text = _readme()
    keys = all_keys()
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k} - {"data.train", "data.eval"}

    def documented(key: str) -> bool:  # list-valued sections are documented as data.train[].path
        variants = {key} | {key.replace(f"{p}.", f"{p}[].", 1) for p in ("data.train", "data.eval", "rewards")}
        return any(f"`{v}`" in text for v in variants)

    missing = [k for k in keys if k not in sections and not documented(k)]
    assert not missing, f"README.md lacks recipe keys: {missing}"


def test_readme_documents_every_command():
    res = run_cli("--help")
    commands = re.findall(r"│ (\w+)\s{2,}", res.stdout)
    assert commands, res.stdout
    for cmd in commands:
        assert f"`tunekit {cmd}" in _readme(), cmd
