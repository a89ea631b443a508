"""The toolkit's one error root. The CLI turns these into clean messages and exit codes."""

from __future__ import annotations

from typing import Any


class ToolkitError(Exception):
    """Root of every error the host toolkit raises on purpose."""

    exit_code = 1


class ProfileError(ToolkitError):
    """A device profile is missing, malformed or describes a device that cannot exist."""


class InputError(ToolkitError):
    """A model file or a data file given by the user cannot be used."""


class ConversionError(ToolkitError):
    """A variant could not be produced (converter failure, quantization impossible, bad ops)."""


class FineTuningError(ToolkitError):
    """Pruning or quantization-aware training did not reach what was asked."""


class ValidationError(ToolkitError):
    """No variant passed the validation gate; carries the table of reasons."""

    def __init__(self, message: str, table: str = ""):
        super().__init__(message + (f"\n{table}" if table else ""))
        self.table = table


class BundleError(ToolkitError):
    """A bundle cannot be written, read or verified."""


class SigningKeyError(ToolkitError):
    """A signing key is missing or unreadable."""


class IdentityError(ToolkitError):
    """A device or host identity cannot be enrolled, found or revoked, or the fleet CA cannot be used."""


class TrustError(ToolkitError):
    """A root key or keyring document is missing, not signed by the root, or not newer than the current one."""


class RegistryError(ToolkitError):
    """The build registry cannot be opened or written."""


class MlflowError(ToolkitError):
    """An MLflow tracking store or model registry cannot be reached, read or written (or MLflow is missing)."""


class BuildFailed(ValidationError):
    """At least one profile got no bundle (refused, or no variant passed); the other profiles' bundles
    were written. Exit code 1 when no bundle was written at all, 3 when some were (``partial``)."""

    def __init__(self, result: Any, message: str, partial: bool = False):
        super().__init__(message, result.table())
        self.result = result
        self.partial = partial
        self.exit_code = 3 if partial else 1
