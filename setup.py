"""Packaging: everything is in pyproject.toml except one mapping it cannot express: the shipped recipes
(recipes/, next to the package in a checkout) travel inside the wheel as `tunekit/recipes/`, so
`tunekit sft sft-lora-demo` and `tunekit run pipelines/assistant-demo` work from an installed wheel too."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["tunekit", "tunekit.*"]), "tunekit.recipes"],
    package_dir={"tunekit.recipes": "recipes"},
)
