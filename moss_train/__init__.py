"""moss-train: train MOSS-style chat models (CodeGen architecture) end to end."""

__version__ = "0.1.0"
