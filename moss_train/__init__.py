"""moss-train: train MOSS-style chat models (CodeGen architecture) end to end."""

import hashlib
import os
import sys

__version__ = "0.1.0"

# DeepSpeed compiles its CPU communication op on first use (about a minute) into torch's
# extension cache. That cache is keyed by Python version only, so two environments (two
# checkouts, two venvs) rebuild each other's build on every start, and wait on its lock. One
# cache per environment keeps each build once. An explicit TORCH_EXTENSIONS_DIR wins.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.join(
        os.path.expanduser("~"),
        ".cache",
        "moss-train",
        "torch_extensions",
        hashlib.sha256(sys.prefix.encode()).hexdigest()[:12],
    ),
)
