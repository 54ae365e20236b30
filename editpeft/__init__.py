"""editpeft: knowledge edits of language models as small, shareable, stackable adapters.

Example:
    >>> import editpeft
    >>> from editpeft import EditRequest
    >>> model, tokenizer = editpeft.load_default_model()                      # doctest: +SKIP
    >>> model = editpeft.enable_editing(model, tokenizer)                     # doctest: +SKIP
    >>> model.add_edit("rome", EditRequest(prompt="The Eiffel Tower is located in the city of",
    ...                subject="Eiffel Tower", target_new="Rome"), name="eiffel")   # doctest: +SKIP
"""
from __future__ import annotations

__version__ = "0.1.0"

from .adapters import EditAdapter, ModuleHookAdapter, RouterAdapter, WeightDeltaAdapter
from .editable import enable_editing
from .editors import Editor, load_editor, train_editor
from .evaluation.runner import evaluate
from .errors import (AdapterFormatError, BaseModelMismatchError, ConfigError, DatasetFormatError, DefaultModelMissingError,
                     EditError, EditOptimizationError, EditorFormatError, EditorRequiredError, InvalidRequestError,
                     MethodFailedError, MethodNotInstalledError, UnknownMethodError, UnsupportedModelError)
from .merge import save_merged
from .method import EditMethod, MethodConfig
from .models import load_default_model
from .registry import list_methods
from .request import EditRequest

__all__ = [
    "__version__", "load_default_model", "enable_editing", "evaluate", "list_methods", "EditRequest", "save_merged",
    "EditMethod", "MethodConfig", "EditAdapter", "WeightDeltaAdapter", "ModuleHookAdapter", "RouterAdapter",
    "EditError", "InvalidRequestError", "ConfigError", "UnknownMethodError", "MethodNotInstalledError",
    "UnsupportedModelError", "BaseModelMismatchError", "MethodFailedError", "AdapterFormatError", "EditOptimizationError",
    "DefaultModelMissingError", "DatasetFormatError",
    "Editor", "train_editor", "load_editor", "EditorFormatError", "EditorRequiredError",
]
