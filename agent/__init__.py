"""edgeship device agent.

The device half of edgeship. It owns the contract both sides speak (bundle format and manifest);
it imports numpy, its runtimes and the standard library only - never TensorFlow, never ``toolkit``.
"""

from agent.errors import (
    AgentError,
    BundleError,
    CompatibilityError,
    ConfigError,
    DeltaError,
    DiskSpaceError,
    HTTPError,
    InputError,
    KeyringError,
    ManifestError,
    ModelError,
    NotReadyError,
    ProtocolError,
    RuntimeMissingError,
    SignatureError,
    StateError,
)

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "BundleError",
    "CompatibilityError",
    "ConfigError",
    "DeltaError",
    "DiskSpaceError",
    "HTTPError",
    "InputError",
    "KeyringError",
    "ManifestError",
    "ModelError",
    "NotReadyError",
    "ProtocolError",
    "RuntimeMissingError",
    "SignatureError",
    "StateError",
    "__version__",
]
