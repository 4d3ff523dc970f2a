"""The kernel lab: inspect, dump, check, bench and tune the Triton kernels, most of it without a GPU.

The ops are those of ``gptfast.kernels.registry``: each op's spec says how to make its inputs, run
its launchers with explicit configurations, check it and benchmark it. ``inspect`` runs an op's
launchers on tensors without data (device "meta") while ``kernels.common.capture_launches`` records
each launch and ``kernels.common.targeting`` makes the launchers configure for the chosen GPU; each
launch is then compiled ahead of time for that GPU (``compiler``) and read (``sass``, ``targets``,
``analysis``). The kernels know nothing of the lab.
CLI: ``gptfast lab ...`` or ``python -m gptfast.lab ...`` (``cli``).
"""

from .analysis import Request, dump, format_report, inspect, inspect_many
from .cli import add_lab_parser
from .compiler import Build, Compiled, LabError, compile_builds
from .ops import get_op
from .targets import ARCHITECTURES, TARGETS, parse_arch, parse_target

__all__ = ["ARCHITECTURES", "TARGETS", "Build", "Compiled", "LabError", "Request", "add_lab_parser", "compile_builds",
           "dump", "format_report", "get_op", "inspect", "inspect_many", "parse_arch", "parse_target"]
