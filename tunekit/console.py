"""One rich console for all human-facing output (stderr), so stdout stays machine-readable."""

from rich.console import Console

console = Console(stderr=True, highlight=False)
