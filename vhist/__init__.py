"""vhist: the history of vision architectures, run on hand-written kernels."""
from vhist.backend import BACKENDS, BackendUnavailable, backend_info, resolve_backend, use_backend
from vhist import ops  # noqa: E402  (registers the vhist:: custom ops)
from vhist import nn  # noqa: E402
from vhist.models import create_model, list_models  # noqa: E402
# vhist.convert(model): the package is callable (see vhist/convert/__init__.py).
from vhist import convert  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnavailable", "backend_info", "resolve_backend", "use_backend", "ops", "nn",
           "create_model", "list_models", "convert"]
