"""Every op's spec, found in the kernels package: each op's module or package that defines
``SPECS = (<OpSpec>, ...)`` is registered, so adding an op registers it (``spec`` says what a spec holds).
``SPECS`` lists them by each spec's ``order``.
"""

from __future__ import annotations

import importlib
import pkgutil

from .spec import OpSpec


def _discover() -> dict[str, OpSpec]:
    found: dict[str, OpSpec] = {}
    for module in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        for spec in getattr(importlib.import_module(f"{__package__}.{module.name}"), "SPECS", ()):
            if spec.name in found:
                raise RuntimeError(f"two ops are named {spec.name!r}")
            same = [other.name for other in found.values() if other.order == spec.order]
            if same:
                raise RuntimeError(f"ops {same[0]!r} and {spec.name!r} have the same order {spec.order}")
            found[spec.name] = spec
    return dict(sorted(found.items(), key=lambda item: item[1].order))


SPECS: dict[str, OpSpec] = _discover()


def get_spec(name: str) -> OpSpec:
    """The spec of the op ``name``; ValueError naming the known ops otherwise."""
    if name not in SPECS:
        raise ValueError(f"unknown op {name!r}: choose one of {', '.join(SPECS)}")
    return SPECS[name]
