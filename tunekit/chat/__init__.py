"""`tunekit chat`: talk to a model, adapter, run or GGUF; and the stop tokens a served model needs."""
