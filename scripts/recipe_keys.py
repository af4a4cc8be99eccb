"""Print the recipe-key reference table (Markdown) from the schema: README.md's table is pasted from this."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from tunekit.config.load import _field_model
from tunekit.config.schema import Recipe


def rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        sub = _field_model(field.annotation)
        dotted = f"{prefix}{field.alias or name}"
        if sub is not None and typing.get_origin(field.annotation) is None and field.annotation is sub:
            yield from rows(sub, dotted + ".")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = "…"
        ann = field.annotation.__name__ if isinstance(field.annotation, type) else str(field.annotation)
        ann = ann.replace("typing.", "").replace("tunekit.config.schema.", "")
        yield dotted, ann, ("required" if field.is_required() else repr(default)), (field.description or "")
        if sub is not None:
            yield from rows(sub, dotted + "[].")


def main() -> None:
    print("| key | type | default | meaning |")
    print("|---|---|---|---|")
    for key, ann, default, desc in rows(Recipe):
        ann = ann.replace("|", "\\|")
        print(f"| `{key}` | {ann} | `{default}` | {desc.replace('|', '/')} |")


if __name__ == "__main__":
    main()
