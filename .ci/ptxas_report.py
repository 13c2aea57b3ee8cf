#!/usr/bin/env python3
"""Register / stack / spill report of every CUDA kernel from a build log with ``ptxas -v`` output.

Build kdfast with ``KDFAST_PTXAS_VERBOSE=1`` (nvcc then gets ``-Xptxas -v``), then::

    python .ci/ptxas_report.py BUILD_LOG [--format text|markdown] [--fail-on SUBSTRING]

prints one row per kernel instantiation and architecture: the demangled name (via
``c++filt`` when it is on PATH; namespaces, return type and, where the template
arguments already tell instantiations apart, the parameter list are left out), the
sm architecture, registers, stack frame bytes and spill store / load bytes.

Exit status: 0 when no kernel whose demangled name contains ``kdfast`` (change with
``--fail-on``) spills; 1 when one does (they are listed); 2 when the log has no
``ptxas -v`` output at all (built without ``KDFAST_PTXAS_VERBOSE=1``?) or cannot be read.

What ptxas prints per ptxas run (one per source file and architecture)::

    ptxas info    : 0 bytes gmem
    ptxas info    : Compiling entry function '_Z...' for 'sm_90'
    ptxas info    : Function properties for _Z...
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 40 registers, used 1 barriers, 392 bytes cmem[0]

Device functions that were not inlined get a ``Function properties`` block without
``Compiling entry function``; they are reported too (registers ``-``), under the
architecture of the ptxas run they belong to. ninja prints the output of each
compile command as one block after a ``[k/n] command`` line, so a block is parsed
as a unit and the source file is taken from that command line. Lines may be indented
(``pip install -v`` indents the build's output).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_FAIL_ON = "kdfast"

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"ptxas info\s*: Used (\d+) registers")
_RUN_START = re.compile(r"ptxas info\s*: \d+ bytes gmem")
_NINJA_STEP = re.compile(r"^\s*\[\d+/\d+\] (.*)$")  # `pip install -v` indents build output
_SOURCE = re.compile(r"(\S+\.cu)(?=\s|$)")


@dataclass
class KernelInfo:
    """What ptxas reported for one function compiled for one architecture."""

    mangled: str
    arch: str | None
    entry: bool  # a __global__ kernel (False: a device function ptxas kept out of line)
    source: str = ""
    registers: int | None = None
    stack_bytes: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    name: str = ""  # demangled (the mangled name when c++filt is missing)
    short_name: str = ""

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes)


class _Parser:
    """Line-by-line state machine over a build log; see the module docstring for the format."""

    def __init__(self) -> None:
        self.kernels: list[KernelInfo] = []
        self.source = ""
        self._new_run()

    def _new_run(self) -> None:
        self.arch: str | None = None  # the architecture of the current ptxas run
        self.by_name: dict[str, KernelInfo] = {}  # functions of the current ptxas run
        self.current: KernelInfo | None = None  # the function whose lines come next

    def _record(self, mangled: str, *, entry: bool) -> KernelInfo:
        info = self.by_name.get(mangled)
        if info is None:
            info = KernelInfo(mangled=mangled, arch=self.arch, entry=entry, source=self.source)
            self.by_name[mangled] = info
            self.kernels.append(info)
        info.entry = info.entry or entry
        return info

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        if m := _NINJA_STEP.match(line):
            # another compile command's block starts: nothing carries over
            self._new_run()
            src = _SOURCE.search(m.group(1))
            self.source = Path(src.group(1).strip("'\"")).name if src else ""
        elif _RUN_START.search(line):
            self._new_run()
        elif m := _ENTRY.search(line):
            self.arch = m.group(2)
            # device functions listed before the first entry of this run share its arch
            for k in self.by_name.values():
                k.arch = k.arch or self.arch
            self.current = self._record(m.group(1), entry=True)
        elif m := _PROPERTIES.search(line):
            self.current = self._record(m.group(1), entry=False)
        elif (m := _FRAME.search(line)) and self.current is not None:
            k = self.current
            k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes = (int(g) for g in m.groups())
        elif (m := _REGISTERS.search(line)) and self.current is not None:
            self.current.registers = int(m.group(1))


def parse_log(lines: Iterable[str]) -> list[KernelInfo]:
    """Every function ptxas reported in ``lines``, in log order, duplicates removed.

    Names are left mangled; :func:`name_kernels` fills in ``name`` / ``short_name``.
    """
    parser = _Parser()
    for line in lines:
        parser.feed(line)
    seen: set[tuple] = set()
    unique = []
    for k in parser.kernels:
        # the same object rebuilt (or a log concatenated from several builds) repeats rows
        key = (k.mangled, k.arch, k.source, k.registers, k.stack_bytes, k.spill_store_bytes,
               k.spill_load_bytes)
        if key not in seen:
            seen.add(key)
            unique.append(k)
    return unique


def demangle(names: Sequence[str]) -> list[str]:
    """Demangles with one ``c++filt`` call; names come back unchanged when it is missing or fails."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    try:
        out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True,
                             check=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return list(names)
    return out if len(out) == len(names) else list(names)


# Readable spellings of the types that appear in kdfast's template arguments.
_TYPE_ALIASES = (
    (re.compile(r"\bc10::BFloat16\b"), "bf16"),
    (re.compile(r"\bc10::Half\b"), "fp16"),
    (re.compile(r"\bunsigned int\b"), "unsigned"),
    (re.compile(r"\blong long\b"), "int64"),
)
_NAMESPACE = re.compile(r"(?:\(anonymous namespace\)|_INTERNAL_\w+|[A-Za-z_]\w*)::")


def _split_parameters(name: str) -> tuple[str, str]:
    """``f<A, B>(int, C<D>)`` -> (``f<A, B>``, ``(int, C<D>)``): the last top-level parenthesis."""
    if not name.endswith(")"):
        return name, ""
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        c = name[i]
        if c in ")>":
            depth += 1
        elif c in "(<":
            depth -= 1
            if depth == 0:
                return (name[:i], name[i:]) if c == "(" and i > 0 else (name, "")
    return name, ""


def shorten(demangled: str, *, keep_parameters: bool = False) -> str:
    """A kernel name for a table: no return type, no namespaces, short type names.

    >>> shorten("void kdfast::cuda::(anonymous namespace)::kd_loss_forward_kernel"
    ...         "<(kdfast::Divergence)0, c10::BFloat16, float>(kdfast::P<float>, long)")
    'kd_loss_forward_kernel<(Divergence)0, bf16, float>'
    """
    name = demangled.strip()
    if name.startswith("void "):
        name = name[len("void "):]
    for pattern, alias in _TYPE_ALIASES:
        name = pattern.sub(alias, name)
    name = _NAMESPACE.sub("", name)
    head, params = _split_parameters(name)
    # a template's arguments name the instantiation; a plain function needs its parameters
    if keep_parameters or not head.endswith(">"):
        return head + params
    return head


def name_kernels(kernels: Sequence[KernelInfo]) -> None:
    """Fills ``name`` (demangled) and ``short_name`` (unique per architecture and source)."""
    names = demangle([k.mangled for k in kernels])
    for k, name in zip(kernels, names):
        k.name = name
        k.short_name = shorten(name)
    # where dropping the parameter list merged two different functions, keep it for them
    groups: dict[tuple, set[str]] = {}
    for k in kernels:
        groups.setdefault((k.short_name, k.arch, k.source), set()).add(k.mangled)
    for k in kernels:
        if len(groups[(k.short_name, k.arch, k.source)]) > 1:
            k.short_name = shorten(k.name, keep_parameters=True)


def offenders(kernels: Sequence[KernelInfo], fail_on: str = DEFAULT_FAIL_ON) -> list[KernelInfo]:
    """The kernels whose demangled (or mangled) name contains ``fail_on`` and that spill."""
    return [k for k in kernels if k.spills and (fail_on in k.name or fail_on in k.mangled)]


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rows(kernels: Sequence[KernelInfo], code: str = "") -> list[list[str]]:
    """Table cells; ``code`` quotes the name (markdown backticks)."""
    many_sources = len({k.source for k in kernels}) > 1
    rows = []
    for k in sorted(kernels, key=lambda k: (k.source, k.short_name, k.arch or "")):
        name = f"{code}{k.short_name}{code}" + ("" if k.entry else " (device function)")
        if many_sources and k.source:
            name = f"{k.source}: {name}"
        rows.append([name, k.arch or "?", _cell(k.registers), _cell(k.stack_bytes),
                     _cell(k.spill_store_bytes), _cell(k.spill_load_bytes)])
    return rows


HEADER = ["kernel", "arch", "registers", "stack B", "spill stores B", "spill loads B"]


def format_table(kernels: Sequence[KernelInfo], style: str = "text") -> str:
    """The report table, as aligned text or as a markdown table."""
    if style == "markdown":
        lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in _rows(kernels, code="`")]
        return "\n".join(lines)
    rows = _rows(kernels)
    widths = [max(len(x) for x in col) for col in zip(HEADER, *rows)]

    def line(cells: Sequence[str]) -> str:
        # the name left-aligned, the numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(HEADER), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", type=Path, help="build log with ptxas -v output (KDFAST_PTXAS_VERBOSE=1)")
    p.add_argument("--format", choices=("text", "markdown"), default="text",
                   help="table style (default text)")
    p.add_argument("--fail-on", default=DEFAULT_FAIL_ON, metavar="SUBSTRING",
                   help=f"fail when a kernel whose name contains this spills (default {DEFAULT_FAIL_ON!r})")
    args = p.parse_args(argv)

    try:
        text = args.log.read_text(errors="replace")
    except OSError as exc:
        print(f"ptxas_report: cannot read {args.log}: {exc}", file=sys.stderr)
        return 2
    kernels = parse_log(text.splitlines())
    if not kernels:
        print(f"ptxas_report: no ptxas -v output in {args.log} (build with KDFAST_PTXAS_VERBOSE=1; "
              "a build that compiled no CUDA file prints none either)", file=sys.stderr)
        return 2
    name_kernels(kernels)
    print(format_table(kernels, args.format))
    entries = sum(k.entry for k in kernels)
    archs = sorted({k.arch for k in kernels if k.arch})
    print(f"\n{entries} kernel instantiations, {len(kernels) - entries} out-of-line device functions, "
          f"archs {', '.join(archs) or '?'}")
    bad = offenders(kernels, args.fail_on)
    if bad:
        print(f"\nFAIL: {len(bad)} kernel(s) whose name contains {args.fail_on!r} spill registers "
              "to local memory:")
        for k in bad:
            print(f"  {k.arch}: {k.name}: {k.spill_store_bytes} bytes spill stores, "
                  f"{k.spill_load_bytes} bytes spill loads, {k.registers} registers")
        return 1
    print(f"ok: no kernel whose name contains {args.fail_on!r} spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
