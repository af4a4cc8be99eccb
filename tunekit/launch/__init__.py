"""Scale-out: the memory planner (`tunekit plan`), accelerate / DeepSpeed / FSDP2 config generation, and
relaunching a training command under `accelerate launch` on several GPUs or machines."""
