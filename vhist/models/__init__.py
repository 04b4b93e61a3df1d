"""The architecture zoo. Every layer is a vhist.nn module, so the active backend decides
which kernels run. Importing this package registers every model."""
from vhist.models._registry import create_model, list_models, register_model
from vhist.models import (alexnet, bn_inception, inception_resnet, inception_v3, inception_v4,  # noqa: F401,E402
                          mobilenet, resnet, vgg, vit)

__all__ = ["create_model", "list_models", "register_model"]
