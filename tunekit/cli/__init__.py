"""Typer CLI: thin wrappers that parse arguments and call one library function each."""
