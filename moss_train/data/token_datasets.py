"""Recipe shard patterns -> shard prefixes, for every stage (pretraining, dialogue and pair shards).

A pattern (relative to ``data.root`` unless absolute, glob characters allowed) may name:

- a *token dataset* folder written by ``moss-data tokenize --out DIR``: its ``manifest.json``
  lists the parts (a folder with only per-node ``manifest.shard-*.json`` files is unfinished:
  ``moss-data merge-manifests DIR``);
- a manifest file (``.../manifest.json``);
- a shard prefix (``PREFIX.json`` is a shard manifest), as written by ShardWriter.

Matches are taken in sorted order, parts in manifest order.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from moss_train.errors import ConfigError

MANIFEST = "manifest.json"
DATASET_FORMAT = "moss-token-dataset"


def _hint(prepare_hint: str) -> str:
    return f"; prepare the data with: {prepare_hint}" if prepare_hint else ""


def dataset_parts(manifest_path: Path, key: str) -> list[str]:
    """Shard prefixes listed by a token dataset manifest (relative to its folder)."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"{manifest_path}: unreadable token dataset manifest: {e}") from None
    if manifest.get("format") != DATASET_FORMAT:
        raise ConfigError(key, f"{manifest_path}: not a {DATASET_FORMAT} manifest")
    return [str(manifest_path.parent / part["name"]) for part in manifest["parts"]]


def _expand(match: Path, key: str) -> list[str]:
    if match.is_dir():
        if (match / MANIFEST).is_file():
            return dataset_parts(match / MANIFEST, key)
        if list(match.glob("manifest.shard-*.json")):
            raise ConfigError(
                key, f"{match}: per-node manifests but no {MANIFEST}: run `moss-data merge-manifests {match}`"
            )
        raise ConfigError(key, f"{match}: no {MANIFEST} (is `moss-data tokenize --out {match}` finished?)")
    return dataset_parts(match, key)


def resolve_shard_prefixes(root: str, patterns: list[str], key: str, prepare_hint: str = "") -> list[str]:
    """Shard prefixes for the recipe's patterns; ConfigError naming `key` when one matches nothing."""
    prefixes: list[str] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(Path(root) / pattern)
        found: list[str] = []
        for match in sorted(glob.glob(full)):
            path = Path(match)
            if path.is_dir() or path.name == MANIFEST:
                found.extend(_expand(path, key))
        # Shard prefixes: PREFIX.json shard manifests (not token dataset manifests).
        found.extend(
            m[: -len(".json")] for m in sorted(glob.glob(full + ".json")) if not Path(m).name.startswith("manifest")
        )
        if not found:
            raise ConfigError(key, f"no token dataset or shard matches {full!r}{_hint(prepare_hint)}")
        prefixes.extend(found)
    return list(dict.fromkeys(prefixes))  # a folder and its own parts may both match
