"""The one exception hierarchy of editpeft. Every message says what to do next."""
from __future__ import annotations


class EditError(Exception):
    """Base class of every error editpeft raises on purpose."""


class InvalidRequestError(EditError, ValueError):
    """An :class:`~editpeft.EditRequest` (or a list of them) cannot be edited as given."""


class ConfigError(EditError, ValueError):
    """A method's hyper-parameters are invalid for this method or model."""


class UnknownMethodError(EditError, LookupError):
    """No installed plugin provides the requested editing method."""


class MethodNotInstalledError(UnknownMethodError):
    """An adapter names a method whose plugin distribution is not installed."""


class UnsupportedModelError(EditError):
    """The model family (``config.model_type``) is not one editpeft knows how to edit."""


class BaseModelMismatchError(EditError):
    """An adapter was computed on another base model than the one it is loaded onto."""


class AdapterFormatError(EditError):
    """An adapter folder is missing a file, corrupt, or of an unknown format."""


class EditOptimizationError(EditError, ArithmeticError):
    """An edit's optimisation diverged (NaN or inf); the model was left unchanged."""


class MethodFailedError(EditError, RuntimeError):
    """A method's computation raised an unexpected error (a bug in it, or an input it does not
    handle); the model was left unchanged. The original exception is chained (``__cause__``)."""


class DefaultModelMissingError(EditError, ImportError):
    """The embedded default model package is not installed."""


class DatasetFormatError(EditError, ValueError):
    """An evaluation file matches no known format, or one of its records is malformed."""


class EditorFormatError(AdapterFormatError):
    """A trained-editor folder is missing a file, corrupt (hash, NaN, shapes) or of an unknown format."""


class EditorRequiredError(EditError):
    """The method edits with a trained editor and none was given (train or load one first)."""


class RoutingError(EditError):
    """A router edit cannot route this call (unsupported decoding mode, or a router that broke
    its contract)."""
