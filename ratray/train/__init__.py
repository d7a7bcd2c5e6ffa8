"""Training, method-agnostic: the one Ray Train + DeepSpeed worker skeleton (`worker.py`), the
sampler, the DeepSpeed config and the driver's trainer + summary (`trainer.py`). A method's worker
(ratray/retro/worker.py, ratray/realm/worker.py) fills in the hooks."""
