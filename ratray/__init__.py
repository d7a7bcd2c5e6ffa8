"""ratray: retrieval-augmented pretraining (RETRO, REALM) on Ray."""
__version__ = "0.1.0"
