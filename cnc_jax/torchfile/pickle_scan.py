"""Checks a pickle before the C unpickler sees it: nothing it asks for may exceed what the stream holds.

Why it exists: the C unpickler trusts the numbers in the stream. A LONG_BINPUT index of 2**32 makes it
grow the memo to that many slots and a BINBYTES8 length of 2**40 makes it allocate that many bytes before
reading them (MemoryError, or gigabytes of address space); a tuple nested a million levels deep, used as a
dict key, makes `hash` recurse in C until the process segfaults (and a deep chain of slices does the same
when it is freed). `check_pickle` walks the opcodes with `pickletools.genops` — which reads every argument
from the stream, so a length beyond its end is refused there — and simulates the unpickler's stack to
bound memo indices by the number of memo writes, frames by the bytes left, and the nesting of what the
pickle builds (and of its open marks) by MAX_NESTING. Only then are the same bytes unpickled.

Nesting is tracked per object: a container's depth is one more than the deepest thing put in it, also
when it is filled later through the memo. A container filled after it was put into another one does not
deepen that one here; that only happens with mutable containers, whose C code (hash refuses them;
freeing, repr and comparison guard their recursion) does not overflow the stack.
"""

from __future__ import annotations

import pickle
import pickletools
from typing import Any, BinaryIO

from cnc_jax.torchfile.errors import CheckpointError

MAX_NESTING = 1000  # torch files nest < 10 levels, Lightning hyper-parameters a few dozen

_LEAVES = frozenset({
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
    "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BYTEARRAY8",
})
_REFERENCES = frozenset({"GLOBAL", "EXT1", "EXT2", "EXT4", "PERSID"})  # objects we cannot see into
_EMPTY_CONTAINERS = frozenset({"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"})
_BUILT_FROM = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3,
               "STACK_GLOBAL": 2, "BINPERSID": 1}  # pop this many, push a new object holding them
_BUILT_FROM_MARK = frozenset({"TUPLE", "LIST", "DICT", "FROZENSET", "INST", "OBJ"})
_FILLS = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}  # pop this many into the object below them
_FILLS_FROM_MARK = frozenset({"APPENDS", "SETITEMS", "ADDITEMS"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


class _Node:
    """One object of the simulated stack: only how deeply it nests."""

    __slots__ = ("depth",)

    def __init__(self, depth: int) -> None:
        self.depth = depth


_LEAF = _Node(0)  # shared by every scalar; never filled


class _Scanner:
    """The unpickler's stack, memo and marks, with depths instead of objects."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.stack: list[_Node] = []
        self.marks: list[list[_Node]] = []
        self.memo: dict[int, _Node] = {}
        self.memo_writes = 0
        self.largest_index = -1
        self.position = 0

    def refuse(self, what: str, at_opcode: bool = True) -> CheckpointError:
        where = f" (at byte {self.position})" if at_opcode else ""
        return CheckpointError(f"refusing the pickle: {what}{where}")

    def step(self, name: str, arg: Any, end: int) -> None:
        """Apply one opcode (its argument ends at byte `end`)."""
        if name in _LEAVES:
            self.stack.append(_LEAF)
        elif name in _REFERENCES:
            self.stack.append(_Node(0))
        elif name in _EMPTY_CONTAINERS:
            self.stack.append(_Node(1))
        elif name in _BUILT_FROM:
            built = self.holding(self.pop(_BUILT_FROM[name]))
            self.stack.append(built)
        elif name in _BUILT_FROM_MARK:
            built = self.holding(self.pop_mark())  # pop first: it switches self.stack to the outer stack
            self.stack.append(built)
        elif name in _FILLS:
            self.fill(self.pop(_FILLS[name]))
        elif name in _FILLS_FROM_MARK:
            self.fill(self.pop_mark())
        else:
            self.other(name, arg, end)

    def other(self, name: str, arg: Any, end: int) -> None:
        if name == "MARK":
            self.marks.append(self.stack)
            self.stack = []
            if len(self.marks) > MAX_NESTING:
                raise self.refuse(f"more than {MAX_NESTING} nested marks")
        elif name == "POP":
            self.pop(1) if self.stack else self.pop_mark()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.stack.append(self.top())
        elif name in _PUTS or name == "MEMOIZE":
            self.put(len(self.memo) if name == "MEMOIZE" else arg)
        elif name in _GETS:
            if arg not in self.memo:
                raise self.refuse(f"memo entry {arg} is read but was never written")
            self.stack.append(self.memo[arg])
        elif name == "FRAME":
            if arg > self.size - end:
                raise self.refuse(f"a frame of {arg} bytes, but only {self.size - end} remain")
        elif name == "PROTO":
            if arg > pickle.HIGHEST_PROTOCOL:
                raise self.refuse(f"unknown pickle protocol {arg}")
        elif name != "STOP":
            raise self.refuse(f"opcode {name} (out-of-band buffers) is not allowed")

    def pop(self, count: int) -> list[_Node]:
        if len(self.stack) < count:
            raise self.refuse("the stack underflows")
        items = self.stack[len(self.stack) - count:]
        del self.stack[len(self.stack) - count:]
        return items

    def pop_mark(self) -> list[_Node]:
        if not self.marks:
            raise self.refuse("a mark is closed that was never opened")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def top(self) -> _Node:
        if not self.stack:
            raise self.refuse("the stack is empty")
        return self.stack[-1]

    def checked(self, depth: int) -> int:
        if depth > MAX_NESTING:
            raise self.refuse(f"objects nested more than {MAX_NESTING} levels deep")
        return depth

    def holding(self, items: list[_Node]) -> _Node:
        return _Node(self.checked(1 + max((item.depth for item in items), default=0)))

    def fill(self, items: list[_Node]) -> None:
        target = self.top()
        if target is _LEAF:
            raise self.refuse("items are added to a scalar")
        target.depth = max(target.depth, self.checked(1 + max((item.depth for item in items), default=0)))

    def put(self, index: Any) -> None:
        if not isinstance(index, int) or index < 0:
            raise self.refuse(f"invalid memo index {index!r}")
        self.memo[index] = self.top()
        self.memo_writes += 1
        self.largest_index = max(self.largest_index, index)

    def finish(self) -> None:
        """At STOP: one object left, no open marks, and memo indices the memo writes account for."""
        if self.marks or len(self.stack) != 1:
            raise self.refuse(f"it ends with {len(self.stack)} objects and {len(self.marks)} open marks")
        if self.largest_index >= self.memo_writes:
            raise self.refuse(f"memo index {self.largest_index} with only {self.memo_writes} memo writes", False)


def check_pickle(stream: BinaryIO, size: int) -> int:
    """Check the pickle that starts at the stream's position (the stream holds `size` bytes in all);
    returns the position just after its STOP. Raises CheckpointError saying what was refused."""
    scanner = _Scanner(size)
    try:
        for opcode, arg, position in pickletools.genops(stream):
            scanner.position = position
            scanner.step(opcode.name, arg, stream.tell())  # genops has just read the argument
    except ValueError as error:  # genops: unknown opcode, truncated argument, length beyond the end
        raise CheckpointError(f"not a valid pickle ({error})") from error
    scanner.finish()
    return stream.tell()
