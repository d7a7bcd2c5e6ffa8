"""Models: plain torch nn.Modules (no Ray, no FAISS)."""
from ratray.models.retro import Retro, RetroConfig

__all__ = ["Retro", "RetroConfig"]
