"""One module-swapping routine: find the modules a predicate selects (outermost first, not
descending into a selected one; a module registered at several places is found at each), then put
a replacement at every place it was found. ``sparsify``, ``to_inference`` and the one-shot
pruners swap modules through it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["Slot", "find_slots", "replace_module", "swap_slots"]

# (parent or None for the root, attribute in the parent, dotted name, module)
Slot = tuple[nn.Module | None, str, str, nn.Module]


def find_slots(
    root: nn.Module,
    wanted: Callable[[nn.Module], bool],
    skip: Callable[[nn.Module], bool] | None = None,
) -> list[Slot]:
    """Every place under ``root`` (``root`` itself included) holding a module ``wanted`` selects,
    in depth-first order. ``skip``: modules below the root that are neither selected nor
    searched (e.g. modules already converted). ``_modules`` rather than ``named_children()``: the
    latter skips a module registered twice under one parent, which would leave its second place
    unswapped."""
    if wanted(root):
        return [(None, "", "", root)]
    found: list[Slot] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent._modules.items():
            if child is None or (skip is not None and skip(child)):
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if wanted(child):
                found.append((parent, attr, name, child))
            else:
                walk(child, name)

    walk(root, "")
    return found


def swap_slots(root: nn.Module, slots: list[Slot], new_of: Callable[[str, nn.Module], nn.Module]):
    """Replace the module at each of ``slots`` by ``new_of(name, module)``, called once per module
    (a shared module stays one shared replacement, named by its first place). Returns the root
    (its replacement if the root itself was a slot)."""
    done: dict[int, nn.Module] = {}
    for parent, attr, name, child in slots:
        if id(child) not in done:
            done[id(child)] = new_of(name, child)
        if parent is None:
            root = done[id(child)]
        else:
            setattr(parent, attr, done[id(child)])
    return root


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every place below ``root`` where ``old`` is registered (``root`` itself is
    never replaced: it has no parent to hold the replacement)."""
    slots = [s for s in find_slots(root, lambda m: m is old) if s[0] is not None]
    swap_slots(root, slots, lambda _name, _module: new)
