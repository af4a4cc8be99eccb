"""Run directories: atomic outputs, run cards, metrics, checkpoints."""
