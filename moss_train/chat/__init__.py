"""Chat: the MOSS prompt format, generation, and the tools MOSS can call."""
