"""Preset: Han et al. 2015's LeNet-5 row (scripts/prune_mnist.py --preset lenet5).

Module-level names are prune_mnist.py's argument names (dest form); a flag on the command line
overrides them. ``search`` is the grid scripts/search_mnist.py runs on the validation split.
LeNet-5's search has not been run yet (a run takes ~25 min on 2 cores): the values below are
the ones of results/lenet5, read off the sensitivity analysis (training images), with the
retraining LR (0.3 x 0.05) set by hand -- see results/lenet5/summary.json.
"""

model = "lenet5"
epochs = 12
lr = 0.05
retrain_lr_factor = 0.3
rounds = 5
retrain_epochs = 3
max_drop = 0.5
sens_n = 5000
total_epochs = 2

search = dict(max_drop=[0.5, 1.0], retrain_lr_factor=[0.1, 0.3])
search_min_compression = 12.0
