"""Presets (scripts/config/*.py) and the recorded validation searches agree: the knobs a preset
marks as searched are the ones results/search/<preset>.json chose, on validation data only."""

import json

import pytest

from scripts._lib import presets
from tests.helpers import ROOT


def test_presets_load_and_name_known_arguments():
    from scripts.prune_mnist import build_parser

    dests = {a.dest for a in build_parser()._actions}
    for name in presets.preset_names():
        settings = presets.run_settings(presets.load_preset(name))
        assert set(settings) <= dests, (name, set(settings) - dests)
    with pytest.raises(ValueError, match="expected a preset among"):
        presets.load_preset("bogus")


@pytest.mark.parametrize("path", sorted((ROOT / "results" / "search").glob("*.json")))
def test_preset_takes_its_search_choice(path):
    search = json.loads(path.read_text())
    preset = presets.load_preset(search["preset"])
    assert search["chosen"] is not None
    for k, v in search["chosen"].items():
        assert preset[k] == v, (k, preset[k], v)
    assert all(r["command"].count("--no-test") == 1 for r in search["runs"])  # test never read
    floor = preset["search_min_compression"]
    ok = [r for r in search["runs"] if r["compression_weights"] >= floor]
    assert min(ok, key=lambda r: r["val_error_pct"])["settings"] == search["chosen"]
    for k, v in search["fixed"].items():  # the settings the search did not vary are unchanged
        if k not in search["chosen"]:
            assert preset[k] == v, (k, preset[k], v)
