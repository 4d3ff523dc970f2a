"""Reading SASS (``cuobjdump -sass``) and PTX: instructions, loops, access widths.

The main loop of a kernel is found by its backward branch: every ``BRA`` to a lower address closes
a loop from its target to the branch (branches to the same target make one loop). Spin-waits on a
barrier are loops too, of a few instructions: loops of fewer than :data:`MIN_LOOP` instructions are
not counted as loops. The main loop is the shortest innermost loop left: a kernel's masked variants
of a loop (the causal diagonal, a row's tail) do the same work plus masking, so they are longer and
run fewer iterations. Instruction counts leave out NOPs (padding). A kernel without a loop is its
own main loop: the whole program, run once per program.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

MIN_LOOP = 12  # instructions: shorter loops are waits (mbarrier, spin) rather than work
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);")
_ACCESS_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers: "LDG.E.128"
    operands: str

    @property
    def name(self) -> str:
        return self.opcode.split(".")[0]


def instructions(sass: str) -> list[Instruction]:
    """Every instruction of the (one-kernel) listing, in address order."""
    return [Instruction(int(a, 16), op, rest.strip()) for a, _, op, rest in _INSTRUCTION.findall(sass)]


def access_bits(opcode: str) -> int:
    """Bits one thread moves with a load or store opcode: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32."""
    for token in opcode.split(".")[1:]:
        if token in _ACCESS_WIDTHS:
            return _ACCESS_WIDTHS[token]
    return 32


@dataclass
class Block:
    """Counts over a range of instructions (a loop body, or a whole kernel), per warp."""

    instructions: int = 0
    mufu: int = 0
    hgmma: int = 0
    hmma: int = 0
    warpgroup_waits: int = 0  # WARPGROUP.DEPBAR: waits for earlier wgmma to finish
    tma_loads: int = 0  # UTMALDG
    async_copies: int = 0  # LDGSTS (cp.async)
    load_bits: Counter = field(default_factory=Counter)  # global loads (LDG, LDGSTS) by width
    store_bits: Counter = field(default_factory=Counter)  # global stores (STG) by width


def count(body: list[Instruction]) -> Block:
    block = Block()
    for ins in body:
        if ins.name == "NOP":
            continue
        block.instructions += 1
        block.mufu += ins.name == "MUFU"
        block.hgmma += ins.name == "HGMMA"
        block.hmma += ins.name == "HMMA"
        block.warpgroup_waits += ins.opcode.startswith("WARPGROUP.DEPBAR")
        block.tma_loads += ins.name == "UTMALDG"
        block.async_copies += ins.name == "LDGSTS"
        if ins.name in ("LDG", "LDGSTS"):
            block.load_bits[access_bits(ins.opcode)] += 1
        elif ins.name == "STG":
            block.store_bits[access_bits(ins.opcode)] += 1
    return block


@dataclass(frozen=True)
class Loop:
    start: int  # index of the first instruction (the branch target)
    end: int  # index of the backward branch, inclusive


def loops(code: list[Instruction]) -> list[Loop]:
    """The loops of ``code`` with at least MIN_LOOP instructions, by their backward branches."""
    index = {ins.address: i for i, ins in enumerate(code)}
    ends: dict[int, int] = {}
    for i, ins in enumerate(code):
        target = re.match(r"(?:`\()?0x([0-9a-f]+)", ins.operands)
        if ins.name == "BRA" and target and int(target.group(1), 16) in index:
            start = index[int(target.group(1), 16)]
            if start < i:
                ends[start] = max(ends.get(start, i), i)
    found = [Loop(s, e) for s, e in ends.items()]
    return [lp for lp in found if count(code[lp.start:lp.end + 1]).instructions >= MIN_LOOP]


def innermost(found: list[Loop]) -> list[Loop]:
    """The loops of ``found`` that hold no other."""
    return [lp for lp in found if not any(o != lp and lp.start <= o.start and o.end <= lp.end for o in found)]


def main_loop(code: list[Instruction]) -> tuple[Loop | None, list[Loop]]:
    """(the main loop or None, all loops): the shortest innermost loop (see the module docstring)."""
    found = loops(code)
    innermost_loops = innermost(found)
    if not innermost_loops:
        return None, found
    return min(innermost_loops, key=lambda lp: (count(code[lp.start:lp.end + 1]).instructions, lp.start)), found


_GLOBAL_ACCESS = {op: re.compile(rf"\b{op}\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfus](\d+)\b") for op in ("ld", "st")}


def global_load_bits(ptx: str) -> Counter:
    """How many global-memory load instructions ``ptx`` has of each width in bits
    (ld.global.v4.b32 counts as one 128-bit load)."""
    return Counter(int(vec or 1) * int(bits) for vec, bits in _GLOBAL_ACCESS["ld"].findall(ptx))


def global_store_bits(ptx: str) -> Counter:
    """The same for global-memory stores (st.global.v4.b32: one 128-bit store)."""
    return Counter(int(vec or 1) * int(bits) for vec, bits in _GLOBAL_ACCESS["st"].findall(ptx))


def serialized_mma(ptxas_log: str) -> list[str]:
    """ptxas's notes that it serialised wgmma instructions (C7515, C7512: a performance loss)."""
    return [line.strip() for line in ptxas_log.splitlines() if re.search(r"\bC75(15|12)\b", line)]
