"""Recipes: the pydantic schema, YAML loading, `--set` overrides, and one clear error per bad key."""

from tunekit.config.load import load_recipe, parse_overrides
from tunekit.config.schema import AdapterConfig, DataConfig, DataSource, ModelConfig, Recipe, TrainConfig

__all__ = [
    "AdapterConfig",
    "DataConfig",
    "DataSource",
    "ModelConfig",
    "Recipe",
    "TrainConfig",
    "load_recipe",
    "parse_overrides",
]
