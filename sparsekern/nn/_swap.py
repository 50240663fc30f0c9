"""One module-swapping routine: find the modules a predicate selects (outermost first, not
descending into a selected one; a module registered at several places is found at each), then put
a replacement at every place it was found."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["Slot", "find_slots", "swap_slots"]

# (parent or None for the root, attribute in the parent, dotted name, module)
Slot = tuple[nn.Module | None, str, str, nn.Module]


def find_slots(root: nn.Module, wanted: Callable[[nn.Module], bool]) -> list[Slot]:
    """Every place under ``root`` (``root`` itself included) holding a module ``wanted`` selects.
    ``_modules`` rather than ``named_children()``: the latter skips a module registered twice
    under one parent, which would leave its second place unswapped."""
    if wanted(root):
        return [(None, "", "", root)]
    found: list[Slot] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent._modules.items():
            if child is None:
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
