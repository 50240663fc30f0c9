"""Han et al. 2015's figures for these networks: Table 1 (error, parameters, compression) and the
weights kept per layer (Table 2 for the LeNets, Tables 4 and 5 for AlexNet and VGG-16), plus
the figures of the later papers the MNIST methods table compares against. Percentages as
printed in the papers.

Table 5's per-layer percentages are rounded in the paper: weighted by torchvision's VGG-16
layer sizes they give 10.5M weights, against its 10.3M.
"""

from __future__ import annotations

__all__ = ["HAN_2015", "METHOD_FIGURES"]

_ALEXNET_KEEP = {"conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37,
                 "fc6": 0.09, "fc7": 0.09, "fc8": 0.25}  # fmt: skip

HAN_2015 = {
    "lenet300": {
        "name": "LeNet-300-100",
        "dense": {"error": 1.64},
        "pruned": {"error": 1.59},
        "params_dense": 267e3,
        "params_pruned": 22e3,
        "compression": 12,
        "kept_pct": {"fc1": 8, "fc2": 9, "fc3": 26, "total": 8},
    },
    "lenet5": {
        "name": "LeNet-5",
        "dense": {"error": 0.80},
        "pruned": {"error": 0.77},
        "params_dense": 431e3,
        "params_pruned": 36e3,
        "compression": 12,
        "kept_pct": {"conv1": 66, "conv2": 12, "fc1": 8, "fc2": 19, "total": 8},
    },
    "alexnet": {
        "name": "AlexNet",
        "dense": {"top1_error": 42.78, "top5_error": 19.73},
        "pruned": {"top1_error": 42.77, "top5_error": 19.67},
        "params_dense": 61e6,
        "params_pruned": 6.7e6,
        "compression": 9,
        "keep": _ALEXNET_KEEP,
        "rounds": 3,
        "retrain_epochs": 20,
    },
    "vgg16": {
        "name": "VGG-16",
        "dense": {"top1_error": 31.50, "top5_error": 11.32},
        "pruned": {"top1_error": 31.34, "top5_error": 10.88},
        "params_dense": 138e6,
        "params_pruned": 10.3e6,
        "compression": 13,
        "rounds": 5,
        "retrain_epochs": 10,
        "keep": {
            "conv1_1": 0.58,
            "conv1_2": 0.22,
            "conv2_1": 0.34,
            "conv2_2": 0.36,
            "conv3_1": 0.53,
            "conv3_2": 0.24,
            "conv3_3": 0.42,
            "conv4_1": 0.32,
            "conv4_2": 0.27,
            "conv4_3": 0.34,
            "conv5_1": 0.35,
            "conv5_2": 0.29,
            "conv5_3": 0.36,
            "fc6": 0.04,
            "fc7": 0.04,
            "fc8": 0.23,
        },
    },  # fmt: skip
}
HAN_2015["alexnet-caffe"] = dict(HAN_2015["alexnet"], name="AlexNet (Caffe)")

# (sparsity %, error %) the papers report on MNIST: SNIP (Lee et al. 2019, LeNet-300-100 and
# LeNet-5-Caffe; their dense nets: 1.7% and 0.9%) and Han's Table 1 row (91.7% = 1 - 1/12).
METHOD_FIGURES = {
    "lenet300": {"snip": [(95, 1.6), (98, 2.4)], "han": [(91.7, 1.59)]},
    "lenet5": {"snip": [(98, 0.8), (99, 1.1)], "han": [(91.7, 0.77)]},
}
