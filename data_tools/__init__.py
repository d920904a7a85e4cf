"""`dydit-data` subcommands (see `data_tools.cli`)."""

from __future__ import annotations

import sys

from dydit_scale.data.format import DataFormatError, expand_shard_spec


def shard_paths(shards: list[str], command: str) -> list[str] | None:
    """The .tar files SHARDS names, or None after printing `dydit-data COMMAND: <why>` on stderr
    (the caller then exits with 2, the code for a bad argument)."""
    try:
        return expand_shard_spec(shards, where=f"{command} SHARDS")
    except DataFormatError as exn:
        print(f"dydit-data {command}: {exn}", file=sys.stderr)
        return None
