"""Data: sources → records (with file:line provenance) → canonical formats → tokens → batches."""
