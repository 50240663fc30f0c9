"""Preset: Han et al. 2015's LeNet-5 row (scripts/prune_mnist.py --preset lenet5).

Module-level names are prune_mnist.py's argument names (dest form); a flag on the command line
overrides them. ``search`` is the grid scripts/search_mnist.py runs on the validation split.
The values marked "searched" are the search's choice (results/search/lenet5.json), not a
hand-picked figure. Fixed, not searched: dense training (12 epochs at peak LR 0.05, Nesterov SGD,
L2 5e-4, warm-up + cosine), 5 prune -> retrain rounds of 3 epochs, the sensitivity analysis on
5,000 training images (Han Fig 6).

The committed row (results/lenet5) is this preset run once on all 60,000 training images, as
Han trained: ``--val-images 0`` (0.76% at 13.1x; Makefile target ``mnist``).
"""

model = "lenet5"
epochs = 12
lr = 0.05
rounds = 5
retrain_epochs = 3
# searched (results/search/lenet5.json): the minimum validation error at >= 12x; the grid's
# validation errors: max_drop 0.4 x factor 0.1 / 0.3: 1.20 / 1.04% (19.6x; dense 1.00%)
max_drop = 0.4
retrain_lr_factor = 0.3
sens_n = 5000
total_epochs = 2

# scripts/search_mnist.py: every combination, each a full run on the 55,000 training images,
# judged on the 5,000 held out. On the committed net's sensitivity curves max_drop 0.4 reaches
# 12.9x (fc1 at quality 1.8) and 0.5 reaches 18.3x (fc1 at 2.0); 0.3-0.45 all give the same
# targets there, 1.0 over 25x (on the search's 55,000-image net, 0.4 reached 19.6x). 0.1 is
# Han's retraining LR factor, 0.3 the hand-set one. max_drop 0.5 (the hand-tuned row's, 18.3x)
# was in the grid and left out: on the shared 2-core machine the first two runs took 60+ min,
# and the four did not fit the session.
search = dict(max_drop=[0.4], retrain_lr_factor=[0.1, 0.3])
search_min_compression = 12.0
