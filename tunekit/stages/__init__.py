"""Training stages. Each stage = its recipe section + data builder + trainer, over the shared pieces in common."""
