"""REALM: the model (towers + reader, marginal likelihood), salient-span masking, the per-step
worker and the driver that jobs/realm_pretrain.py calls. Importing the package imports nothing
heavy."""
