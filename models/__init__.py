"""Reference models for sparsekern's experiments (Han et al. 2015's LeNets)."""

from models.lenet import DROPOUT_FEEDS, MODELS, LeNet5, LeNet300100, build_model, count_weights

__all__ = ["DROPOUT_FEEDS", "MODELS", "LeNet5", "LeNet300100", "build_model", "count_weights"]
