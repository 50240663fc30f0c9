"""Calibration that a loaded machine cannot fool (issue 24, item 6): under load the static rule
decides, the load check ignores this process's own work, timing happens at the batch the user
passes, layers of one shape share one decision, and the whole model is bounded in time."""

import importlib

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import _timing
from sparsekern.nn import inference_choices, to_inference

chooser = importlib.import_module("sparsekern.nn.inference.chooser")


def _mlp(n=3, seed=0):
    torch.manual_seed(seed)
    model = sk.sparsify(nn.Sequential(*[nn.Linear(64, 64) for _ in range(n)]))
    gen = torch.Generator().manual_seed(seed)
    for m in model:
        sk.set_mask(m, torch.rand(64, 64, generator=gen) < 0.05)
    return model.eval()


def _recording_measure(calls, ratio=3.0):
    def measure(modules, make_input, batch_sizes, device, budget_s=2.0):
        calls.append((tuple(batch_sizes), tuple(make_input(batch_sizes[0]).shape)))
        return {f: {b: (10.0, 1.0 if f == "dense" else ratio) for b in batch_sizes}
                for f in modules}  # fmt: skip

    return measure


def test_loaded_machine_warns_and_takes_the_static_rule(monkeypatch):
    calls = []
    monkeypatch.setattr(chooser, "_measure", _recording_measure(calls))
    monkeypatch.setattr(chooser, "machine_busy", lambda: "other processes keep 2.0 of 2 cores")
    with pytest.warns(UserWarning, match=r"keep 2.0 of 2 cores; timings would be noise"):
        exported = to_inference(_mlp())
    assert calls == []  # nothing timed
    for c in inference_choices(exported).values():
        assert c.source == "static" and "machine loaded" in c.reason
    assert inference_choices(exported)["0"].format == "dense"  # 64x64 at 5%: above the rule


def test_own_process_load_does_not_count(monkeypatch):
    # the machine's 2 cores were fully busy during the window, all of it this process's time
    stats = iter([(0.0, 1000.0), (200.0, 1200.0)])
    times = iter([(0.0, 0.0, 0, 0, 0), (0.5, 0.0, 0, 0, 0)])
    monkeypatch.setattr(_timing, "_proc_stat_busy", lambda: next(stats))
    monkeypatch.setattr(_timing.os, "times", lambda: next(times))
    monkeypatch.setattr(_timing.os, "cpu_count", lambda: 2)
    clock = iter([0.0, 0.25])
    monkeypatch.setattr(_timing.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(_timing.time, "sleep", lambda s: None)
    assert _timing.other_load(0.25) == pytest.approx(0.0)
    # the same busy machine, none of it ours: 2 cores taken by others
    stats = iter([(0.0, 1000.0), (200.0, 1200.0)])
    times = iter([(0.0, 0.0, 0, 0, 0), (0.0, 0.0, 0, 0, 0)])
    clock = iter([0.0, 0.25])
    assert _timing.other_load(0.25) == pytest.approx(2.0)


def test_layers_of_one_shape_share_one_timed_decision(monkeypatch):
    calls = []
    monkeypatch.setattr(chooser, "_measure", _recording_measure(calls))
    monkeypatch.setattr(chooser, "machine_busy", lambda: None)
    exported = to_inference(_mlp(4))
    assert len(calls) == 1
    choices = inference_choices(exported)
    assert {c.format for c in choices.values()} == {"csr"}
    assert all("as timed for '0'" in choices[n].reason for n in ("1", "2", "3"))
    x = torch.randn(2, 64)
    torch.testing.assert_close(exported(x), _mlp(4)(x))


def test_timed_at_the_batch_the_user_passes(monkeypatch):
    calls = []
    monkeypatch.setattr(chooser, "_measure", _recording_measure(calls))
    monkeypatch.setattr(chooser, "machine_busy", lambda: None)
    to_inference(_mlp(1), example_input=torch.randn(5, 64))
    assert calls == [((5,), (5, 64))]
    to_inference(_mlp(1), example_input=torch.randn(5, 64), batch_sizes=(1, 3))
    assert calls[-1] == ((1, 3), (1, 64))


def test_budget_spent_falls_back_to_the_static_rule(monkeypatch):
    calls = []
    monkeypatch.setattr(chooser, "_measure", _recording_measure(calls))
    monkeypatch.setattr(chooser, "machine_busy", lambda: None)
    monkeypatch.setattr(chooser, "CALIBRATION_BUDGET_S", 0.0)
    exported = to_inference(_mlp(2))
    assert calls == []
    assert all("budget" in c.reason for c in inference_choices(exported).values())
