"""Errors that carry the recipe key they are about, so a user sees one clear message."""


class ConfigError(ValueError):
    """A recipe value is unknown, of the wrong type, or impossible together with another.

    `key` is the full dotted recipe key (e.g. ``model.n_head``) the message is about.
    """

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):  # picklable, so one rank's verdict can be broadcast to the others
        return ConfigError, (self.key, self.message)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read: corrupt, missing or unsafe file, no disk space."""
