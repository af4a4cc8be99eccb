"""Model and tokenizer loading: base models, the embedded default, tiny builders for tests."""
