"""Evaluation: perplexity on assistant tokens and exact match of greedy generations."""
