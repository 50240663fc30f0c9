"""argparse types: the message names what was expected and what was given."""

import argparse

import pytest

from scripts._lib import checks as cli


def _err(parse, text):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        parse(text)
    return str(e.value)


def test_number_bounds_and_messages():
    pos = cli.number(int, 1)
    assert pos("3") == 3
    assert _err(pos, "0") == "expected an integer >= 1, got 0"
    assert _err(pos, "1.5") == "expected an integer >= 1, got '1.5'"
    lr = cli.number(float, 0, lo_open=True)
    assert lr("0.1") == 0.1
    for bad in ("0", "-1", "nan", "inf", "x"):
        assert "expected a number > 0" in _err(lr, bad)
    frac = cli.fraction(hi_open=True)
    assert frac("0") == 0.0 and "< 1" in _err(frac, "1") and "<= 1" not in _err(frac, "1.5")


def test_per_layer_and_nm():
    spec = cli.per_layer(cli.fraction(), "sparsity")
    assert spec("0.5") == 0.5
    assert spec("fc1=0.5, fc2=0.25") == {"fc1": 0.5, "fc2": 0.25}
    assert _err(spec, "fc1=0.5,fc2=2") == "fc2: expected a number >= 0 and <= 1, got 2"
    assert "given twice" in _err(spec, "fc1=0.5,fc1=0.6")
    assert "layer=sparsity" in _err(spec, "fc1=0.5,=3")
    assert cli.unknown_layer_keys({"fc1": 1, "conv": 2, "fc9": 3}, ["fc1", "fc2"]) == ["fc9"]
    assert cli.unknown_layer_keys(0.5, ["fc1"]) == []
    assert cli.nm_pattern("2:4") == (2, 4)
    for bad in ("5:4", "0:4", "2-4", "a:b", "2:"):
        assert "expected N:M" in _err(cli.nm_pattern, bad)
