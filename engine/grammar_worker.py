"""The grammar compile worker: a child process that turns JSON schemas and regexes into xgrammar grammars.

Run by engine/grammar.py as `python engine/grammar_worker.py` (a script, so that it imports xgrammar
and nothing of the engine). Compiling runs here and not in the server process because a hostile
schema can take minutes and gigabytes (a few thousand properties, a regex of nested alternatives),
and a thread cannot be stopped: this process can be killed at the time limit, and its address space
is capped. It runs at a lower CPU priority than the engine's step thread.

Protocol over stdin/stdout, one frame per message: 4-byte big-endian length, then the bytes.
  parent -> child, first: the TokenizerInfo as xgrammar's JSON; then one request per frame,
    b"json\\n" + schema text or b"regex\\n" + pattern
  child -> parent: b"O" + the compiled grammar as xgrammar's JSON, or b"E" + an error message
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import struct
import sys
from typing import BinaryIO

NICE = 10
# Address space the compiler may add to what the process holds after importing xgrammar (and torch).
COMPILE_MEMORY_BYTES = 4 << 30
COMPILE_THREADS = 2
# JSON Schema keywords xgrammar 0.2 ignores: a schema using one is refused (422) rather than producing
# output that does not validate. (`minContains` needs `contains`, so it is covered by it.)
IGNORED_KEYWORDS = ("uniqueItems", "contains", "dependentRequired", "dependentSchemas", "if", "then", "else")
# Nor does it apply minLength / maxLength to a string that also has a `pattern`.
LENGTH_KEYWORDS = ("minLength", "maxLength")
_VALUE_KEYWORDS = frozenset({"const", "enum", "default", "examples", "description", "title", "required"})
_NAMED_SUBSCHEMAS = frozenset({"properties", "$defs", "definitions", "patternProperties"})
# xgrammar prefixes its messages with a timestamp and a C++ source location: not for the client.
_CPP_PREFIX = re.compile(r"^\[[\d:.]+\]\s+\S+:\d+:\s*")


def read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    data = stream.read(size)
    return data if len(data) == size else None


def write_frame(stream: BinaryIO, data: bytes) -> None:
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def clean_message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [_CPP_PREFIX.sub("", line).strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line)[:500]


def unsupported_feature(node: object, where: str = "#") -> str | None:
    """The first schema feature the compiler would silently ignore, as a message naming where it is."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            found = unsupported_feature(item, f"{where}/{i}")
            if found:
                return found
        return None
    if not isinstance(node, dict):
        return None
    for key in IGNORED_KEYWORDS:
        if key in node and not (key == "uniqueItems" and node[key] is False):
            return f"the keyword {key!r} (at {where}) is not supported"
    if "pattern" in node and any(k in node for k in LENGTH_KEYWORDS):
        return (f"`pattern` together with minLength/maxLength (at {where}) is not supported; put the length "
                f"into the pattern, e.g. ^[a-z]{{1,20}}$")
    for key, value in node.items():
        if key in _VALUE_KEYWORDS:
            continue
        if key in _NAMED_SUBSCHEMAS and isinstance(value, dict):  # {name: subschema}: a name is not a keyword
            found = next((f for name, sub in value.items() if (f := unsupported_feature(sub, f"{where}/{key}/{name}"))),
                         None)
        else:
            found = unsupported_feature(value, f"{where}/{key}")
        if found:
            return found
    return None


def _cap_memory() -> None:
    try:
        with open("/proc/self/statm") as f:
            held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = held + COMPILE_MEMORY_BYTES
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError):  # not Linux, or a limit we may not raise: run uncapped
        pass


def main() -> None:
    with contextlib.suppress(OSError):
        os.nice(NICE)
    import xgrammar as xgr

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    first = read_frame(stdin)
    if first is None:
        return
    info = xgr.TokenizerInfo.deserialize_json(first.decode())
    compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
    _cap_memory()
    write_frame(stdout, b"O")  # ready
    while (request := read_frame(stdin)) is not None:
        kind, _, value = request.decode().partition("\n")
        try:
            if kind == "json":
                problem = unsupported_feature(json.loads(value))
                if problem:
                    raise ValueError(problem)
                # Compact separators with one space after ',' and ':' (json.dumps' default layout): no
                # free whitespace, which small models would otherwise emit without end.
                compiled = compiler.compile_json_schema(value, any_whitespace=False, strict_mode=True)
            elif kind == "regex":
                compiled = compiler.compile_regex(value)
            else:
                raise ValueError(f"unknown grammar type {kind!r}")
            write_frame(stdout, b"O" + compiled.serialize_json().encode())
        except MemoryError:
            write_frame(stdout, b"E" + b"compiling it needed more memory than a grammar may use")
        except Exception as exc:
            message = clean_message(exc)
            if "bad_alloc" in message or "memory" in message.lower():
                message = "compiling it needed more memory than a grammar may use"
            write_frame(stdout, b"E" + message.encode())


if __name__ == "__main__":
    main()
