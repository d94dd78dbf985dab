"""Storage options that name a Prefect Secret block ({"$secret": "NAME"}) are read here, in the process
that opens the storage, so the secret never passes through a flow's parameters."""

from __future__ import annotations

import functools
from typing import Any

from batchinfer.config import SECRET_REFERENCE, register_resolver
from batchinfer.errors import ConfigError


@functools.cache
def secret_block(name: str) -> Any:
    from prefect.blocks.system import Secret

    try:
        return Secret.load(name).get()
    except Exception as exc:  # noqa: BLE001 - the name and the kind of failure; never a value
        raise ConfigError(
            f"--storage-options names the Prefect Secret block {name!r}, which cannot be read ({type(exc).__name__})"
        ) from None


register_resolver(SECRET_REFERENCE, secret_block)
