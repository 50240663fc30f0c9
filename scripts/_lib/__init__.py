"""What the experiment scripts share and a library user does not need: presets, command-line
checks, the MNIST recipes, Han et al.'s figures and the Table 1 / methods-table reports. Not
installed (``pip install .`` ships ``sparsekern`` only); the scripts put the repository root on
``sys.path`` (:mod:`scripts._lib.bootstrap`), and so does pytest (``tests/`` is a package)."""
