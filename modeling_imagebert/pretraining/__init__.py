"""Multi-stage pre-training: recipes (YAML), the stage batch schedule, checkpoints and resume, the model card and
loss curves. Used by `examples/run_pretrain.py`; nothing in the model files imports it."""
