"""RETRO: the model, its neighbours ([N, F] with the leakage filter), batches, the per-step worker
and the driver that jobs/retro_pretrain.py calls. Importing the package imports nothing heavy."""
