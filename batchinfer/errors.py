"""A small error hierarchy: every error users can cause carries one clear line.

`BatchInferError.__str__` is the line the CLI prints. Errors are raised `from exc`
so the original cause stays in the traceback for developers, never as the only
message. `transient` says whether a retry may help.
"""

from __future__ import annotations


class BatchInferError(Exception):
    """Base class: a failure that users can understand and act on."""

    transient = False

    def __init__(self, message: str, *, uri: str | None = None, shard_id: str | None = None):
        self.message = message
        self.uri = uri
        self.shard_id = shard_id
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class ConfigError(BatchInferError):
    """A parameter has a value we cannot use (names the field and the value)."""


class InputError(BatchInferError):
    """The input data is missing, unreadable or malformed (names the file)."""


class SchemaError(InputError):
    """A column is missing, has the wrong type or holds bad values (names the column)."""


class ModelError(BatchInferError):
    """The model spec or checkpoint cannot be loaded or misbehaves."""


class StorageError(BatchInferError):
    """Reading or writing storage failed."""


class TransientStorageError(StorageError):
    """A storage failure that may pass: throttling, timeouts, connection resets."""

    transient = True


class DeviceError(BatchInferError):
    """A requested device does not exist or cannot be used."""


class NoHealthyDevice(DeviceError):
    """Every device this process may use has left its pool (fatal device errors, failed loads)."""


class DeviceLostError(BatchInferError):
    """A shard failed because its device broke; retrying helps while another device of the pool is healthy."""

    def __init__(self, message: str, *, transient: bool = False, shard_id: str | None = None):
        super().__init__(message, shard_id=shard_id)
        self.transient = transient

    def __reduce__(self):  # keeps `transient` across processes (a process pool's worker raises it)
        return (type(self), (self.message,), {"transient": self.transient, "shard_id": self.shard_id})


class OutputConflictError(BatchInferError):
    """The output location holds a run with another configuration, or overlaps the input."""


class OutputInUseError(OutputConflictError):
    """Another run holds the output (its lock or lease); names that run."""


class ValidationError(BatchInferError):
    """Merge-and-validate found a problem; names the shard and the check."""


class ShardFailedError(BatchInferError):
    """One shard failed; carries the shard id and the reason."""


class Stopped(BatchInferError):
    """The run is stopping (an interrupt, a cancelled run): a shard gave up before it committed anything."""


class InjectedFault(BatchInferError):
    """Raised by fault injection hooks used in tests and drills."""

    transient = True
