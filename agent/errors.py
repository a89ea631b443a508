"""The agent's one error root and its subclasses.

Every error names the file, key or tensor it is about and, where it can, what to do.
"""


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    exit_code = 1


class BundleError(AgentError):
    """A bundle is malformed, truncated, unsafe or fails a hash check."""


class SignatureError(BundleError):
    """A bundle's signature is missing, invalid or made by a key the device does not trust."""


class ManifestError(BundleError):
    """A manifest does not follow the bundle schema."""


class CompatibilityError(BundleError):
    """A bundle was built for another architecture or runtime than this device has."""


class RuntimeMissingError(AgentError):
    """The runtime a model needs is not installed on this device."""



class ModelError(AgentError):
    """A model failed to load or to run in its runtime."""


class InputError(AgentError):
    """Inference input does not match what the model expects."""


class KeyringError(AgentError):
    """A trusted key file cannot be read or parsed."""


class TrustError(KeyringError):
    """A keyring document is not signed by the root key, not newer than the one trusted, or expired."""


class SealError(BundleError):
    """An encrypted bundle cannot be opened here: not encrypted for this device's key, or no key configured."""


class ConfigError(AgentError):
    """The agent configuration is missing a value or has a wrong one."""


class StateError(AgentError):
    """The agent's state file is unreadable."""


class StorageError(AgentError):
    """The device lacks the free disk space an update needs."""


class BusyError(AgentError):
    """The state dir is owned by another process (a running agent or another command)."""


class ControlError(AgentError):
    """The local control channel of a running agent failed or refused a request."""


class NotReadyError(AgentError):
    """No model is installed yet."""


class ProtocolError(AgentError):
    """An MQTT message is malformed, unsigned, stale or not for this device."""


class DeltaError(AgentError):
    """A patch could not be made, applied, or did not rebuild the expected bundle."""


class HTTPError(AgentError):
    """An HTTP request the local API refuses; carries the status code to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NonFiniteOutputError(ModelError):
    """A model produced NaN or Inf; the answer is withheld and counted as a failed request."""


class SequenceError(InputError):
    """A sequence id is unknown, expired or ended, or its sequence parameters are malformed."""


class CapacityError(AgentError):
    """A configured capacity limit is reached (e.g. live sequences); the client may retry later."""
