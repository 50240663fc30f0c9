"""What the pruning code needs to know about a model's wiring, read from a ``torch.fx`` trace.

Two questions are answered here:

* which ``nn.Dropout`` module sits on the input of each sparse layer (for Han's dropout rule), and
* which pairs of sparse layers form a *chain* ``A -> (element-wise / pooling / flatten ops) -> B``,
  where A's output feeds nothing but B (for dead-neuron removal).

The sparse layers (and every ``nn.Linear`` / ``nn.Conv*``) are traced as leaves, so their masked
kernels are never traced through. A model fx cannot trace (data-dependent control flow) makes
:func:`trace` return None, and the callers fall back or report it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sparsekern.pruning._layers import layer_kind, sparse_layers

DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

# Per-element functions: a neuron whose value is a constant c stays the constant f(c). Dropout is
# listed too: it is the identity in eval mode, the mode in which "outputs stay the same" is meant.
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    torch.tanh,
    F.tanh,
    torch.sigmoid,
    F.sigmoid,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
# Pooling keeps a constant channel constant (max of c's is c, mean of c's is c) as long as no zero
# padding enters an average; max pooling pads with -inf, which never wins against c.
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_AVG_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}


class _LeafTracer(fx.Tracer):
    """Keeps Linear/Conv layers (dense or sparse) as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.Graph | None:
    """The fx graph of ``model`` (leaves: standard ``torch.nn`` modules and every Linear/Conv), or
    None when fx cannot trace it."""
    try:
        return _LeafTracer().trace(model)
    except Exception:  # fx raises many types (TraceError, TypeError from control flow, ...)
        return None


def is_shape_query(node: fx.Node) -> bool:
    """``x.size(0)``, ``x.dim()``, ``x.shape``: uses of a tensor that do not read its values."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return (
        node.op == "call_function"
        and node.target in (getattr, operator.getitem)
        and len(node.args) > 1
        and node.args[1] in ("shape", "dtype", "device")
    )


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_shape_query(u)]


def _only_tensor_arg_is(node: fx.Node, src: fx.Node) -> bool:
    """True when ``src`` is the first argument and no other argument is a traced tensor (shape
    queries such as ``x.size(0)`` in ``x.view(x.size(0), -1)`` are allowed)."""
    if not node.args or node.args[0] is not src:
        return False
    others = list(node.args[1:]) + list(node.kwargs.values())
    flat: list = []
    for a in others:
        flat.extend(a if isinstance(a, (tuple, list)) else [a])
    return all(not isinstance(a, fx.Node) or is_shape_query(a) for a in flat)


@dataclass
class _Step:
    """One op between two layers: ``kind`` is "elementwise", "dropout", "pool" or "flatten";
    ``apply`` maps a constant activation to what the op makes of it (element-wise ops only);
    ``constant_safe`` is False for an op that can turn a constant channel into a non-constant one
    (an average pool that counts zero padding)."""

    kind: str
    name: str
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None
    constant_safe: bool = True


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> _Step | None:
    """The op ``node`` as a chain step, or None when it is not one of the known transparent ops."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, DROPOUT_MODULES):
            return _Step("dropout", node.target)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return _Step("elementwise", node.target, apply=m)
        if isinstance(m, _POOL_MODULES):
            return _Step("pool", node.target)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            pad = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,)
            safe = all(p == 0 for p in pad) or not m.count_include_pad
            return _Step("pool", node.target, constant_safe=safe)
        if isinstance(m, nn.Flatten):
            return _Step("flatten", node.target) if m.start_dim == 1 and m.end_dim == -1 else None
        return None
    if node.op == "call_function":
        t = node.target
        if t in _DROPOUT_FUNCTIONS:
            return _Step("dropout", str(node))
        if t in _ELEMENTWISE_FUNCTIONS:
            args, kwargs = node.args[1:], dict(node.kwargs)
            kwargs.pop("inplace", None)
            return _Step("elementwise", str(node), apply=lambda x, t=t: t(x, *args, **kwargs))
        if t in _POOL_FUNCTIONS:
            return _Step("pool", str(node))
        if t in _AVG_POOL_FUNCTIONS:
            pad = node.kwargs.get("padding", node.args[3] if len(node.args) > 3 else 0)
            cip = node.kwargs.get("count_include_pad", node.args[5] if len(node.args) > 5 else True)
            pad = pad if isinstance(pad, (tuple, list)) else (pad,)
            return _Step("pool", str(node), constant_safe=all(p == 0 for p in pad) or not cip)
        if t is torch.flatten:
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            return _Step("flatten", str(node)) if start == 1 and end == -1 else None
        return None
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            meth = node.target.rstrip("_")
            return _Step("elementwise", str(node), apply=lambda x, m=meth: getattr(x, m)())
        if node.target == "flatten":
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            return _Step("flatten", str(node)) if start == 1 and end == -1 else None
        if node.target in _FLATTEN_METHODS:
            return _Step("flatten", str(node))
    return None


def dropout_feeds(model: nn.Module, graph: fx.Graph | None = None) -> dict[str, str] | None:
    """``{dropout module name: sparse layer name}`` for every ``nn.Dropout`` module whose output
    reaches a sparse layer's input through element-wise, pooling or flatten ops only (e.g. LeNet's
    ``fc2(drop1(relu(fc1(x))))`` gives ``{"drop1": "fc2"}``). A dropout module used in front of
    several layers maps to the first one met. None when the model cannot be traced."""
    graph = graph if graph is not None else trace(model)
    if graph is None:
        return None
    modules = dict(model.named_modules())
    layers = sparse_layers(model)
    feeds: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers or not node.args:
            continue
        src = node.args[0]
        while isinstance(src, fx.Node):
            step = _classify(src, modules)
            if step is None:
                break
            if step.kind == "dropout" and src.op == "call_module":
                feeds.setdefault(src.target, node.target)
                break
            src = src.args[0] if src.args else None
    return feeds


@dataclass
class Chain:
    """``producer -> steps -> consumer``: every value of the producer's output goes only through
    ``steps`` into the consumer's input.

    ``block`` is how many consumer inputs one producer neuron (output channel) becomes: 1 for
    FC -> FC and conv -> conv, ``H*W`` for conv -> flatten -> FC (channel ``j`` becomes inputs
    ``j*H*W .. (j+1)*H*W - 1``, flatten being channel-major). ``constant_safe`` is False when a
    step can turn a constant channel into a non-constant one.
    """

    producer: str
    consumer: str
    block: int
    steps: list[_Step] = field(default_factory=list)
    constant_safe: bool = True

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the chain's element-wise ops to a constant activation ``x`` ``[1, C]``."""
        for s in self.steps:
            if s.kind == "elementwise":
                x = s.apply(x)
        return x


def _groups(m: nn.Module) -> int:
    return getattr(m, "groups", 1)


def find_chains(model: nn.Module, graph: fx.Graph | None = None) -> list[Chain]:
    """All producer -> consumer chains between sparse layers of ``model`` (see :class:`Chain`).

    A pair qualifies when both layers are called exactly once, the producer's output (and each
    intermediate value) has exactly one value-reading user, every op in between is element-wise,
    dropout, pooling or flatten, both layers are ungrouped, and the sizes match: FC -> FC
    ``consumer.in == producer.out``; conv -> conv ``consumer.in_channels ==
    producer.out_channels`` (no flatten); conv -> flatten -> FC
    ``consumer.in % producer.out_channels == 0``. Empty when the model cannot be traced.
    """
    graph = graph if graph is not None else trace(model)
    if graph is None:
        return []
    modules = dict(model.named_modules())
    layers = sparse_layers(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    # A layer called at several places (weight sharing) cannot shrink for one use only.
    layers = {n: m for n, m in layers.items() if calls.get(n, 0) == 1}
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers:
            continue
        a = layers[node.target]
        steps: list[_Step] = []
        cur = node
        consumer = None
        while True:
            users = _value_users(cur)
            if len(users) != 1:
                break
            nxt = users[0]
            if nxt.op == "call_module" and nxt.target in layers:
                if nxt.args and nxt.args[0] is cur and len(nxt.args) == 1 and not nxt.kwargs:
                    consumer = nxt.target
                break
            if not _only_tensor_arg_is(nxt, cur):
                break
            step = _classify(nxt, modules)
            if step is None:
                break
            steps.append(step)
            cur = nxt
        if consumer is None or consumer == node.target:
            continue
        b = layers[consumer]
        if _groups(a) != 1 or _groups(b) != 1:
            continue
        flattened = any(s.kind == "flatten" for s in steps)
        ka, kb = layer_kind(a), layer_kind(b)
        n_out = a.weight.shape[0]
        n_in = b.weight.shape[1]
        # FC -> FC, or conv -> conv without a flatten between: one input per neuron
        same_kind = ka == kb and (ka == "fc" or not flattened)
        if same_kind and n_in == n_out:
            block = 1
        elif ka == "conv" and kb == "fc" and flattened and n_in % n_out == 0:
            block = n_in // n_out
        else:
            continue
        safe = all(s.constant_safe for s in steps)
        chains.append(Chain(node.target, consumer, block, steps, safe))
    return chains
