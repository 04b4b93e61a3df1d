"""The architecture zoo. Every layer is a vhist.nn module, so the active backend decides
which kernels run. Importing this package registers every model."""
from vhist.models._common import DropPath, drop_path_rates, prologue_pairs
from vhist.models.initialization import INITS, initialize
from vhist.models._registry import (ModelConfig, create_model, list_models, model_config, register_model,
                                    unknown_model_message)
from vhist.models import (alexnet, bn_inception, inception_resnet, inception_v3, inception_v4,  # noqa: F401,E402
                          mobilenet, resnet, vgg, vit)

__all__ = ["DropPath", "INITS", "ModelConfig", "create_model", "drop_path_rates", "initialize", "list_models",
           "model_config", "prologue_pairs", "register_model", "unknown_model_message"]
