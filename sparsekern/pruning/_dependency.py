"""Channel dependency graph for structured pruning, read from a ``torch.fx`` trace plus a shape
pass (the idea of Torch-Pruning's DepGraph, at the granularity of single channels).

Every output channel of a *producer* (an ungrouped ``Conv2d`` or a 2-D ``Linear``) gets an integer
id. The trace is walked once, carrying for every tensor value the ids of its dim-1 entries
(channels, or features after a flatten):

* element-wise ops, pooling, dropout, BatchNorm and depthwise convs pass the ids through (the BN
  and the depthwise conv become *members*: their per-channel parameters are sliced with them);
* ``a + b`` (and ``*``, ``-``, ...) unions the ids position by position: a residual add couples
  channel ``i`` of every branch, so they are kept or removed together;
* ``torch.cat(dim=1)`` concatenates the id lists (each input keeps its own offset range);
* a flatten ``[B, C, H, W] -> [B, C*H*W]`` repeats each id ``H*W`` times (flatten is
  channel-major), so a Linear consumer loses the ``H*W`` columns of each removed channel;
* a consumer (ungrouped conv, Linear) records the ids its input columns read;
* a Linear on ``[..., C]`` (ConvNeXt's channels-last MLP, a transformer's MLP) makes its ids
  describe the *last* dim; such values pass element-wise ops on equal shapes only (GELU,
  dropout, adds of two channels-last values), everything else blocks them, so an MLP's hidden
  units are prunable while permutes, LayerNorm, attention and the residual stream stay.

Union-find over the ids gives the *coupled channels* (equivalence classes). A class is *blocked*
(never removed) when it reaches the model output (the classifier keeps all its outputs), a model
input or constant, or any op not understood here (general grouped convs, slicing, reshapes that
mix channels, unknown modules): whatever cannot be followed is left as it is.

Classes whose producer sets are equal form a *group* (e.g. the 64 channels of a ResNet stage's
residual stream, which conv1 and every block's last conv write): ``amount`` applies per group.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from sparsekern.pruning._graph import _LeafTracer, is_shape_query

__all__ = ["ChannelGraph", "build_channel_graph", "rebuild_pruned", "plain_copy"]


def is_attention(m: nn.Module) -> bool:
    """``nn.MultiheadAttention`` (and subclasses) or sparsekern's ``PrunedMultiheadAttention``:
    traced as one opaque node (their heads are pruned by ``structured_heads``, not here)."""
    return isinstance(m, nn.MultiheadAttention) or getattr(m, "_channel_graph_leaf", False)


class _AttentionLeafTracer(_LeafTracer):
    """The pruning tracer's leaves, plus every attention (sparsekern's sparse one is traced
    into otherwise, and ``nn.MultiheadAttention.forward`` is not traceable)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_attention(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.Graph | None:
    """The fx graph of ``model``, or None when fx cannot trace it."""
    try:
        return _AttentionLeafTracer().trace(model)
    except Exception:  # fx raises many types (TraceError, TypeError from control flow, ...)
        return None


_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_PASS_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.clone,
    torch.nn.functional.hardtanh_, torch.clamp,
}  # fmt: skip
_PASS_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "clone", "contiguous", "clamp",
    "clamp_", "float", "to", "detach",
}  # fmt: skip
_BINARY = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    torch.add, torch.sub, torch.mul, "add", "add_", "sub", "sub_", "mul", "mul_",
}  # fmt: skip
_FLATTEN = {torch.flatten, "flatten", "view", "reshape"}


def is_conv(m: nn.Module) -> bool:
    """Plain ``nn.Conv2d`` or a subclass holding a mask (SparseConv2d)."""
    return isinstance(m, nn.Conv2d) and (type(m) is nn.Conv2d or hasattr(m, "mask"))


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and (type(m) is nn.Linear or hasattr(m, "mask"))


def is_depthwise(m: nn.Module) -> bool:
    return is_conv(m) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def dense_weight(m: nn.Module) -> torch.Tensor:
    """The weight a layer computes with: ``weight * mask`` for sparsekern layers."""
    w = m.weight.detach()
    mask = getattr(m, "mask", None)
    return w * mask if mask is not None else w


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.blocked: list[bool] = []
        #: ``{root: (order, why)}``: the first op that blocked the class (for the messages of
        #: what is left)
        self.why: dict[int, tuple[int, str]] = {}

    def new(self, n: int, blocked: bool = False, why: str = "") -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.blocked.extend([blocked] * n)
        if blocked:
            self.why.update(dict.fromkeys(range(start, start + n), (len(self.why), why)))
        return torch.arange(start, start + n)

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if self.blocked[rb] and (
                not self.blocked[ra] or self.why.get(rb, (0,)) < self.why.get(ra, (0,))
            ):
                self.why[ra] = self.why.get(rb, (0, ""))
            self.blocked[ra] = self.blocked[ra] or self.blocked[rb]

    def block(self, ids: torch.Tensor, why: str = "") -> None:
        for i in ids.unique().tolist():
            r = self.find(i)
            if not self.blocked[r]:
                self.why[r] = (len(self.why), why)
            self.blocked[r] = True


@dataclass
class Group:
    """Coupled channels that share one set of producers; ``classes`` are union-find roots, in
    the order of the first producer's channels."""

    producers: tuple[str, ...]
    classes: list[int]
    bns: list[str] = field(default_factory=list)


@dataclass
class ChannelGraph:
    """The result of :func:`build_channel_graph`.

    ``out_ids[name]``: ``[C_out]`` ids of a producer's or depthwise conv's output channels;
    ``in_ids[name]``: ``[C_in]`` ids of a consumer's, depthwise conv's or BN's input columns
    (features for a Linear after a flatten). ``groups``: the prunable groups; ``root(i)`` maps an
    id to its class."""

    uf: _UnionFind
    out_ids: dict[str, torch.Tensor]
    in_ids: dict[str, torch.Tensor]
    producers: list[str]
    depthwise: list[str]
    bns: list[str]
    consumers: list[str]
    groups: list[Group]
    #: consumers (Linear on ``[..., C]``) whose input channels are the last dim, not dim 1
    last_dim: set[str] = field(default_factory=set)

    _table: torch.Tensor | None = None

    def roots(self, ids: torch.Tensor) -> torch.Tensor:
        """``[K]`` class (union-find root) of each id (the graph is final once built)."""
        if self._table is None or len(self._table) != len(self.uf.parent):
            self._table = torch.tensor([self.uf.find(i) for i in range(len(self.uf.parent))])
        return self._table[ids]

    def keep(self, ids: torch.Tensor, removed: set[int]) -> torch.Tensor:
        """``[K]`` bool: the id's class is not in ``removed``."""
        if not removed:
            return torch.ones(len(ids), dtype=torch.bool)
        gone = torch.zeros(len(self.uf.parent), dtype=torch.bool)
        gone[torch.tensor(sorted(removed))] = True
        return ~gone[self.roots(ids)]

    def left_depthwise(self) -> dict[str, str]:
        """``{depthwise conv: the op that blocked it}`` for the depthwise convs whose channels
        are all kept (coupled to something not followed: ConvNeXt's stage width)."""
        out = {}
        for name in self.depthwise:
            roots = self.roots(self.in_ids[name]).unique().tolist()
            if all(self.uf.blocked[r] for r in roots):
                out[name] = self.uf.why.get(roots[0], (0, ""))[1] or "an op not followed"
        return out

    def group_of_layer(self) -> dict[str, int]:
        """``{producer name: group index}`` for the producers of prunable groups."""
        return {p: gi for gi, g in enumerate(self.groups) for p in g.producers}


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    flat: list = []
    for a in list(node.args) + list(node.kwargs.values()):
        flat.extend(a if isinstance(a, (tuple, list)) else [a])
    return [a for a in flat if isinstance(a, fx.Node)]


def _shape(node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def build_channel_graph(model: nn.Module, example_inputs: tuple) -> ChannelGraph:
    """Trace ``model`` (eval mode, no grad: nothing in it changes) and build its channel graph.

    Raises:
        ValueError: the model cannot be traced by torch.fx.
    """
    graph = trace(model)
    if graph is None:
        raise ValueError(
            f"prune_channels: expected a model torch.fx can trace, got a {type(model).__name__} "
            "that fx cannot trace (data-dependent control flow?)"
        )
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    model.eval()  # the shape pass must not update BatchNorm statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    uf = _UnionFind()
    ids: dict[fx.Node, torch.Tensor] = {}
    out_ids: dict[str, torch.Tensor] = {}
    in_ids: dict[str, torch.Tensor] = {}
    producers: list[str] = []
    depthwise: list[str] = []
    bns: list[str] = []
    consumers: list[str] = []
    last_dim: set[str] = set()
    # the dim of each value that ``ids`` describes: 1 (NCHW channels, features), or the last dim
    # after a Linear on ``[..., C]`` (ConvNeXt's channels-last MLP, a transformer's MLP)
    cdim: dict[fx.Node, int] = {}

    def is_last(node) -> bool:
        s = _shape(node)
        return node in cdim and s is not None and len(s) > 2 and cdim[node] == len(s) - 1

    def describe(node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(modules[node.target]).__name__} {node.target}"
        stack = node.meta.get("nn_module_stack")
        where = node.name
        if stack:  # the module the op is traced inside, e.g. a LayerNorm2d's permute
            path, cls = list(stack.values())[-1]
            where = f"{getattr(cls, '__name__', cls)} {path}"
        if node.op == "call_method":
            return f".{node.target}() in {where}"
        if node.op == "call_function":
            return f"{getattr(node.target, '__name__', node.target)} in {where}"
        if node.op == "get_attr":
            return f"the tensor {node.target}"
        return {"placeholder": "a model input", "output": "the model output"}[node.op]

    def fresh_blocked(node: fx.Node) -> None:
        s = _shape(node)
        if s is not None and len(s) >= 2:
            ids[node] = uf.new(s[1], blocked=True, why=describe(node))

    def block_inputs(node: fx.Node) -> None:
        for a in _tensor_args(node):
            if a in ids:
                uf.block(ids[a], describe(node))

    def record_input(name: str, t: torch.Tensor) -> None:
        # a module called at several places reads the same columns at each: couple them
        if name in in_ids:
            prev = in_ids[name]
            if prev.numel() != t.numel():
                uf.block(prev, f"{name} called on inputs of different widths")
                uf.block(t, f"{name} called on inputs of different widths")
                return
            for a, b in zip(prev.tolist(), t.tolist()):
                uf.union(a, b)
        else:
            in_ids[name] = t

    for node in graph.nodes:
        if node.op == "placeholder" or node.op == "get_attr":
            fresh_blocked(node)
            continue
        if node.op == "output":
            block_inputs(node)
            continue
        if is_shape_query(node):
            continue
        targs = [a for a in _tensor_args(node) if a in ids]
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        xs, ys = _shape(x), _shape(node)
        handled = False
        if node.op == "call_module":
            m = modules[node.target]
            name = node.target
            single = x is not None and len(targs) == 1 and targs[0] is x and x in ids
            if is_linear(m) and xs and len(xs) > 2 and len(targs) == 1 and targs[0] is x:
                # Linear on [..., C]: its input and output channels are the last dim
                if x in ids and is_last(x):
                    t_in = ids[x]
                else:  # what x's ids describe (dim 1) is read across: not followed
                    why = f"{type(m).__name__} {name} on the last dim of a channels-first value"
                    if x in ids:
                        uf.block(ids[x], why)
                    t_in = uf.new(xs[-1], blocked=True, why=why)
                record_input(name, t_in)
                if name not in consumers:
                    consumers.append(name)
                last_dim.add(name)
                if name not in out_ids:
                    out_ids[name] = uf.new(m.weight.shape[0])
                    producers.append(name)
                ids[node] = out_ids[name]
                cdim[node] = len(ys) - 1
                handled = True
            elif (is_conv(m) and m.groups == 1) or (is_linear(m) and xs and len(xs) == 2):
                if single and not is_last(x):
                    record_input(name, ids[x])
                    if name not in consumers:
                        consumers.append(name)
                    if name not in out_ids:
                        out_ids[name] = uf.new(m.weight.shape[0])
                        producers.append(name)
                    ids[node] = out_ids[name]
                    handled = True
            elif is_depthwise(m) or isinstance(m, nn.BatchNorm2d):
                if single and not is_last(x) and ys is not None and ys[1] == xs[1]:
                    record_input(name, ids[x])
                    lst = depthwise if is_depthwise(m) else bns
                    if name not in lst:
                        lst.append(name)
                    ids[node] = ids[x]
                    handled = True
            elif (
                isinstance(m, _PASS_MODULES)
                and single
                and ys
                and len(ys) >= 2
                and (ys == xs if is_last(x) else ys[1] == xs[1])
            ):
                ids[node] = ids[x]
                if is_last(x):
                    cdim[node] = cdim[x]
                handled = True
            elif isinstance(m, nn.Flatten) and single and not is_last(x):
                handled = _flatten(node, x, xs, ys, ids)
        elif node.op in ("call_function", "call_method") and any(is_last(a) for a in targs):
            # channel-last values: only element-wise ops on equal shapes are followed
            t = node.target
            same = ys is not None and all(_shape(a) == ys for a in targs)
            if same and t in _BINARY and all(is_last(a) for a in targs):
                handled = _binary(node, targs, ys, ids, uf)
                cdim[node] = len(ys) - 1
            elif same and (t in _PASS_FUNCTIONS or t in _PASS_METHODS) and len(targs) == 1:
                ids[node] = ids[x]
                cdim[node] = len(ys) - 1
                handled = True
        elif node.op in ("call_function", "call_method"):
            t = node.target
            if t in _BINARY and ys is not None and len(ys) >= 2:
                handled = _binary(node, targs, ys, ids, uf)
            elif t in (torch.cat, torch.concat) and ys is not None:
                handled = _cat(node, targs, ys, ids, uf)
            elif t in _FLATTEN and x in ids and len(targs) == 1:
                handled = _flatten(node, x, xs, ys, ids)
            elif (
                (t in _PASS_FUNCTIONS or t in _PASS_METHODS)
                and x in ids
                and len(targs) == 1
                and ys is not None
                and len(ys) >= 2
                and ys[1] == xs[1]
            ):
                ids[node] = ids[x]
                handled = True
            elif t in ("mean", torch.mean, "sum", "amax") and x in ids and len(targs) == 1:
                dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
                dims = dims if isinstance(dims, (tuple, list)) else (dims,)
                if (
                    ys
                    and len(ys) >= 2
                    and ys[1] == xs[1]
                    and all(d in (2, 3, -1, -2) for d in dims)
                ):
                    ids[node] = ids[x]
                    handled = True
        if not handled:
            # not understood: whatever it reads stays as it is, whatever it makes is not prunable
            block_inputs(node)
            fresh_blocked(node)

    groups = _groups(uf, out_ids, producers, in_ids, bns)
    return ChannelGraph(uf, out_ids, in_ids, producers, depthwise, bns, consumers, groups, last_dim)


def _flatten(node, x, xs, ys, ids) -> bool:
    if xs is None or ys is None:
        return False
    if ys == xs:
        ids[node] = ids[x]
        return True
    if len(xs) >= 3 and len(ys) == 2 and ys[0] == xs[0] and ys[1] == math.prod(xs[1:]):
        ids[node] = ids[x].repeat_interleave(math.prod(xs[2:]))
        return True
    return False


def _binary(node, targs, ys, ids, uf) -> bool:
    full = [a for a in targs if _shape(a) is not None and len(_shape(a)) >= 2]
    if not full or any(_shape(a)[1] != ys[1] for a in full):
        return False  # channel broadcasting: not followed
    first = ids[full[0]]
    for a in full[1:]:
        for i, j in zip(first.tolist(), ids[a].tolist()):
            uf.union(i, j)
    ids[node] = first
    return True


def _cat(node, targs, ys, ids, uf) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    parts = node.args[0]
    if not isinstance(parts, (tuple, list)) or not all(p in ids for p in parts):
        return False
    if dim in (1, -len(ys) + 1):
        ids[node] = torch.cat([ids[p] for p in parts])
        return True
    if dim == 0:  # stacking batches: the same channels
        return _binary(node, list(parts), ys, ids, uf)
    return False


def _groups(uf, out_ids, producers, in_ids, bns) -> list[Group]:
    members: dict[int, set[str]] = {}
    order: dict[int, int] = {}
    for p in producers:
        for i in out_ids[p].tolist():
            r = uf.find(i)
            members.setdefault(r, set()).add(p)
            order.setdefault(r, len(order))
    by_key: dict[tuple, Group] = {}
    for r in sorted(members, key=order.get):
        if uf.blocked[r]:
            continue
        key = tuple(sorted(members[r]))
        g = by_key.setdefault(key, Group(key, []))
        g.classes.append(r)
    for g in by_key.values():
        cls = set(g.classes)
        g.bns = [b for b in bns if uf.find(int(in_ids[b][0])) in cls]
    return list(by_key.values())


# ---------------------------------------------------------------------------------- rebuilding
def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    # t comes from boolean indexing: already a fresh tensor, no clone needed
    return nn.Parameter(t, requires_grad=like.requires_grad)


def _new_conv(m: nn.Conv2d, keep_out, keep_in, groups: int) -> nn.Conv2d:
    w = dense_weight(m)[keep_out][:, keep_in]
    new = nn.Conv2d(
        w.shape[1] * groups,
        w.shape[0],
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        groups,
        m.bias is not None,
        m.padding_mode,
        device="meta",
        dtype=w.dtype,
    )  # fmt: skip  (meta: no random init of weights that are replaced at once)
    new.weight = _param(w, m.weight)
    if m.bias is not None:
        new.bias = _param(m.bias.detach()[keep_out], m.bias)
    new.train(m.training)
    return new


def _new_linear(m: nn.Linear, keep_out, keep_in) -> nn.Linear:
    w = dense_weight(m)[keep_out][:, keep_in]
    new = nn.Linear(w.shape[1], w.shape[0], m.bias is not None, device="meta", dtype=w.dtype)
    new.weight = _param(w, m.weight)
    if m.bias is not None:
        new.bias = _param(m.bias.detach()[keep_out], m.bias)
    new.train(m.training)
    return new


def _new_bn(m: nn.BatchNorm2d, keep) -> nn.BatchNorm2d:
    n = int(keep.sum())
    new = nn.BatchNorm2d(
        n, m.eps, m.momentum, m.affine, m.track_running_stats,
        device=(m.weight if m.affine else m.running_mean).device,
        dtype=(m.weight if m.affine else m.running_mean).dtype,
    )  # fmt: skip
    if m.affine:
        new.weight = _param(m.weight.detach()[keep], m.weight)
        new.bias = _param(m.bias.detach()[keep], m.bias)
    if m.track_running_stats:
        new.running_mean = m.running_mean[keep].clone()
        new.running_var = m.running_var[keep].clone()
        new.num_batches_tracked = m.num_batches_tracked.clone()
    new.train(m.training)
    return new


def plain_copy(m: nn.Module) -> nn.Module:
    """A sparsekern layer as its plain PyTorch base (weights times mask); others unchanged."""
    if getattr(m, "mask", None) is None:
        return m
    if is_conv(m):
        full = torch.ones(m.out_channels, dtype=torch.bool)
        return _new_conv(m, full, torch.ones(m.weight.shape[1], dtype=torch.bool), m.groups)
    full = torch.ones(m.out_features, dtype=torch.bool)
    return _new_linear(m, full, torch.ones(m.in_features, dtype=torch.bool))


@torch.no_grad()
def rebuild_pruned(model: nn.Module, cg: ChannelGraph, removed: set[int]) -> int:
    """Replace, in ``model`` (already a copy), every layer touched by the ``removed`` classes by
    a smaller plain one, and every sparsekern layer by its plain base. Returns the number of
    layers replaced."""
    modules = dict(model.named_modules())

    def keep_of(ids: torch.Tensor) -> torch.Tensor:
        return cg.keep(ids, removed)

    replaced = 0
    inside = {n for n, m in modules.items() if is_attention(m)}
    for name, m in list(modules.items()):
        if name.rpartition(".")[0] in inside:
            continue  # an attention's own projections: structured_heads rebuilds attentions
        keep_out = keep_in = None
        if name in cg.bns:
            keep = keep_of(cg.in_ids[name])
            if not bool(keep.all()):
                _set_module(model, name, _new_bn(m, keep))
                replaced += 1
            continue
        if not (is_conv(m) or is_linear(m)):
            continue
        n_out, n_in = m.weight.shape[0], m.weight.shape[1]
        if name in cg.depthwise:
            keep = keep_of(cg.in_ids[name])
            if not bool(keep.all()):
                _set_module(model, name, _new_conv(m, keep, slice(None), int(keep.sum())))
                replaced += 1
            elif getattr(m, "mask", None) is not None:
                _set_module(model, name, plain_copy(m))
            continue
        keep_out = (
            keep_of(cg.out_ids[name]) if name in cg.out_ids else torch.ones(n_out, dtype=bool)
        )
        keep_in = keep_of(cg.in_ids[name]) if name in cg.in_ids else torch.ones(n_in, dtype=bool)
        if bool(keep_out.all()) and bool(keep_in.all()):
            if getattr(m, "mask", None) is not None:
                _set_module(model, name, plain_copy(m))
            continue
        new = (
            _new_conv(m, keep_out, keep_in, m.groups)
            if is_conv(m)
            else _new_linear(m, keep_out, keep_in)
        )
        _set_module(model, name, new)
        replaced += 1
    return replaced
