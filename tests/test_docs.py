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


def _top_level_names(file) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _dotted_resolves(ref: str) -> bool:
    """`tunekit.a.b[.name]`: a module of the package, optionally followed by a name defined at its top level."""
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        file = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if file.is_file():
            rest = parts[cut:]
            return not rest or rest[0] in _top_level_names(file)
    return False


def test_module_references_in_docs_resolve():
    """Every `tunekit/...` path and `tunekit.module[.name]` in the README and docs/ (in code spans) exists, so a
    moved module or a renamed function cannot leave the docs pointing at nothing."""
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for span in re.findall(r"`([^`\n]+)`", doc.read_text()):
            for path in re.findall(r"(?<![\w/.])tunekit/[\w/.{},-]*", span):
                path = path.split("{")[0].rstrip("/.")
                if not ((ROOT / path).exists() or any(ROOT.glob(path + "*"))):
                    missing.append(f"{doc.name}: {path}")
            for ref in re.findall(r"(?<![\w/.])tunekit(?:\.\w+)+", span):
                if not _dotted_resolves(ref):
                    missing.append(f"{doc.name}: {ref}")
    assert not missing, "docs name what does not exist:\n" + "\n".join(missing)
