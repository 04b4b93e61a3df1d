"""The architecture zoo. Every layer is a vhist.nn module, so the active backend decides
which kernels run. Importing this package registers every model."""
from vhist.models._registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
