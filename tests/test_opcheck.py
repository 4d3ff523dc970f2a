"""torch.library.opcheck over every custom operator the kernels register: schema, autograd
registration, and the fake implementation (derived from the launcher) against the real one, with
static and dynamic shapes. Each op's cases are its own test file's ``opcheck_cases()``
(``tests/test_<op>.py``), so a new op brings its cases with its tests."""

import importlib

import pytest
import torch

from gptfast.kernels.registry import SPECS

pytestmark = pytest.mark.usefixtures("on_kernel_device")


def cases(op: str) -> list:
    """(custom operator, arguments) of ``tests/test_<op>.py``'s ``opcheck_cases()``."""
    return importlib.import_module(f"test_{op}").opcheck_cases()


@pytest.mark.parametrize("op", SPECS)
def test_opcheck(op):
    torch.manual_seed(0)
    for custom_op, args in cases(op):
        torch.library.opcheck(custom_op, args)


def test_every_custom_op_is_checked():
    """A new operator in the gptfast namespace must get a case in its op's test file."""
    registered = {name for name in torch.ops.gptfast}
    checked = {custom_op._name for op in SPECS for custom_op, _ in cases(op)}
    assert registered == checked
