"""Training internals shared by the stages: the memory-lean LM loss, its Trainer, packed attention."""
