"""Chat: generation, the two-pass tool protocol, and the tools MOSS can call (the turn format: moss_train.format)."""
