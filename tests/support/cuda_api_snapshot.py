"""Snapshot of the cuda-python 12 runtime API that engines/runners/cuda_memory.py relies on.

Where the data comes from: the installed cuda-python of the CUDA 12 line (the ``test`` extra
pins ``cuda-python>=12.2,<13``), module ``cuda.bindings.runtime`` (``cuda.cudart`` before
12.6). Its functions are Cython functions whose ``inspect.signature`` gives the Python
parameter names, whose docstring's first line gives the C types and whose numpydoc
"Returns" section lists the tuple each call returns (``cudaError_t`` first). No GPU is
needed: nothing is called, only inspected.

Regenerate::

    .venv/bin/pip install 'cuda-python>=12.2,<13'
    .venv/bin/python tests/support/cuda_api_snapshot.py      # writes cuda_runtime_12_api.json

It also prints what the calls return on this machine (on one without a GPU or driver:
cudaErrorInsufficientDriver or cudaErrorNoDevice); that is not stored, as it depends on
the machine. The JSON is sorted and holds no dates or paths.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "cuda_runtime_12_api.json"

# what cuda_memory.py calls, plus what a memory layer and the fake in fake_cudart/ use
FUNCTIONS = sorted([
    "cudaGetDeviceCount", "cudaGetDevice", "cudaSetDevice", "cudaGetDeviceProperties",
    "cudaDeviceGetAttribute", "cudaDeviceSynchronize", "cudaMemGetInfo",
    "cudaMalloc", "cudaFree", "cudaMallocHost", "cudaFreeHost", "cudaHostAlloc",
    "cudaMemcpy", "cudaMemcpyAsync", "cudaMemset", "cudaMemsetAsync",
    "cudaStreamCreate", "cudaStreamCreateWithFlags", "cudaStreamSynchronize",
    "cudaStreamDestroy", "cudaStreamQuery",
    "cudaGetErrorName", "cudaGetErrorString", "cudaGetLastError", "cudaPeekAtLastError",
    "cudaDriverGetVersion", "cudaRuntimeGetVersion",
])
ENUMS = ["cudaDeviceAttr", "cudaError_t", "cudaMemcpyKind"]
CLASSES = ["cudaDeviceProp", "cudaStream_t"]
CONSTANTS = ["cudaHostAllocDefault", "cudaHostAllocMapped", "cudaHostAllocPortable",
             "cudaHostAllocWriteCombined", "cudaStreamDefault", "cudaStreamNonBlocking"]


def import_runtime() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # cuda-python < 12.6
    return runtime


def _section(doc: str, title: str) -> list[str]:
    """The lines of a numpydoc section (``Returns``, ``Parameters``), dedented."""
    lines = doc.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.strip() == title and set(lines[i + 1].strip()) == {"-"}:
            indent = len(line) - len(line.lstrip())
            body = []
            for j in range(i + 2, len(lines)):
                if j + 1 < len(lines) and lines[j].strip() and set(lines[j + 1].strip()) == {"-"}:
                    break   # the next section's title
                body.append(lines[j][indent:])
            return body
    return []


def _entries(lines: list[str]) -> list[dict[str, str]]:
    """numpydoc entries: unindented ``name : type`` or ``type`` lines."""
    out = []
    for line in lines:
        if not line.strip() or line.startswith((" ", "\t")):
            continue
        name, sep, kind = line.partition(" : ")
        entry = {"name": name.strip(), "type": kind.strip()} if sep else {"name": "", "type": name.strip()}
        entry["type"] = re.sub(r":py:obj:`~?\.?([^`]+)`", r"\1", entry["type"])
        out.append(entry)
    return out


def describe_function(func: Any) -> dict[str, Any]:
    doc = func.__doc__ or ""
    params = []
    for p in inspect.signature(func).parameters.values():
        entry = {"name": p.name}
        if p.annotation is not p.empty:
            entry["annotation"] = p.annotation if isinstance(p.annotation, str) else p.annotation.__name__
        if p.default is not p.empty:
            entry["default"] = repr(p.default)
        params.append(entry)
    return {"kind": "function", "params": params, "c_signature": doc.splitlines()[0].strip() if doc else "",
            "param_types": _entries(_section(doc, "Parameters")),
            "returns": _entries(_section(doc, "Returns"))}


def describe_class(cls: type) -> dict[str, Any]:
    instance = cls()
    fields = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        static = inspect.getattr_static(cls, name)
        if callable(static) and not hasattr(static, "__get__") or type(static).__name__ in (
                "method_descriptor", "builtin_function_or_method", "cython_function_or_method"):
            fields[name] = {"kind": "method"}
        else:
            value = getattr(instance, name)
            fields[name] = {"kind": "field", "type": type(value).__name__}
    dunders = sorted(d for d in ("__int__", "__index__", "__eq__", "__hash__")
                     if any(d in k.__dict__ for k in cls.__mro__ if k is not object))
    return {"kind": "class", "members": fields, "dunders": dunders}


def snapshot(rt: Any) -> dict[str, Any]:
    names: dict[str, Any] = {}
    for name in FUNCTIONS:
        names[name] = describe_function(getattr(rt, name))
    for name in ENUMS:
        names[name] = {"kind": "enum", "members": {k: int(v) for k, v in getattr(rt, name).__members__.items()}}
    for name in CLASSES:
        names[name] = describe_class(getattr(rt, name))
    for name in CONSTANTS:
        names[name] = {"kind": "constant", "type": type(getattr(rt, name)).__name__,
                       "value": int(getattr(rt, name))}
    versions = {}
    for dist in ("cuda-python", "cuda-bindings"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"module": rt.__name__, "source": {"distributions": versions,
                                             "generated_by": "tests/support/cuda_api_snapshot.py"},
            "names": names}


def observed(rt: Any) -> dict[str, str]:
    """What a few calls return on this machine (printed, not stored)."""
    calls = {"cudaGetDeviceCount()": lambda: rt.cudaGetDeviceCount(),
             "cudaMalloc(16)": lambda: rt.cudaMalloc(16),
             "cudaStreamCreate()": lambda: rt.cudaStreamCreate(),
             "cudaDriverGetVersion()": lambda: rt.cudaDriverGetVersion(),
             "cudaRuntimeGetVersion()": lambda: rt.cudaRuntimeGetVersion()}
    return {k: repr(f()) for k, f in calls.items()}


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    ns = parser.parse_args(args)
    rt = import_runtime()
    data = snapshot(rt)
    ns.output.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{ns.output}: {len(data['names'])} names from {rt.__name__} {data['source']['distributions']}")
    for call, result in observed(rt).items():
        print(f"  {call} -> {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
