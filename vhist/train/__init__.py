"""Training and evaluation: ``vhist train`` / ``vhist eval`` (see :mod:`vhist.train.engine`)."""
from vhist.train.data import DatasetError, load_data
from vhist.train.engine import TrainConfig, train
from vhist.train.evaluation import evaluate_checkpoint
from vhist.train.recipes import RECIPES, Recipe, get_recipe

__all__ = ["DatasetError", "load_data", "TrainConfig", "evaluate_checkpoint", "train", "RECIPES", "Recipe",
           "get_recipe"]
