"""Snapshot of the real TensorRT 10.3 Python API, for checking the fake in fake_tensorrt/.

Where the data comes from: PyPI's ``tensorrt-cu12-bindings==10.3.0`` wheel, the same pybind11
module (``tensorrt.so`` plus its ``__init__.py``) that JetPack 6.1/6.2 ship as
``python3-libnvinfer``. The module links libnvinfer, libnvonnxparser and libnvinfer_plugin
but only binds nine C entry points from them (``createInferBuilder_INTERNAL`` and so on), so
stub libraries built here with gcc, each entry point returning NULL, let it import on a
machine without a GPU or NVIDIA's libraries. Nothing then works (``trt.Builder(logger)``
raises TypeError: the factory returned nullptr) but every class, enum and docstring is the
real one: pybind11 docstrings carry each method's signature, which is what is recorded.

Regenerate (needs network access to PyPI, gcc and nm; CPython 3.8-3.12 on x86-64 Linux)::

    .venv/bin/python tests/support/trt_api_snapshot.py            # writes tensorrt_10_3_api.json
    .venv/bin/python tests/support/trt_api_snapshot.py --wheel W  # from a wheel already downloaded

The JSON is sorted and holds no dates or paths, so a regeneration that changes nothing gives
an identical file.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "tensorrt-cu12-bindings"
VERSION = "10.3.0"
MODULE = "tensorrt_bindings"
HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "tensorrt_10_3_api.json"
# prefixes the pybind11 docstrings put on type names; stripped so names read as ``trt.X``
_PREFIXES = ("tensorrt_bindings.tensorrt.", "tensorrt.tensorrt.", "tensorrt_bindings.")
# dunders worth recording when a TensorRT class itself defines them
_DUNDERS = {"__init__", "__len__", "__getitem__", "__setitem__", "__iter__", "__eq__", "__ne__",
            "__int__", "__index__", "__hash__", "__str__", "__repr__", "__enter__", "__exit__",
            "__del__", "__call__", "__contains__", "__bool__"}


# ------------------------------------------------------------------ run in the subprocess
def _clean(text: str) -> str:
    for prefix in _PREFIXES:
        text = text.replace(prefix, "")
    return text


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split ``text`` at ``sep`` outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _param(text: str) -> dict[str, str]:
    default = None
    if " = " in text:
        text, default = text.split(" = ", 1)
    name, _, annotation = text.partition(": ")
    entry = {"name": name.strip()}
    if annotation:
        entry["annotation"] = _clean(annotation.strip())
    if default is not None:
        entry["default"] = _clean(default.strip())
    return entry


def _pybind_signatures(name: str, doc: str) -> list[dict[str, Any]]:
    """The signatures in a pybind11 docstring (one per overload) with their ``:returns:``."""
    lines = (doc or "").splitlines()
    pattern = re.compile(r"^(?:\d+\. )?" + re.escape(name) + r"\((.*)\) -> (.*)$")
    found: list[tuple[int, re.Match]] = [(i, m) for i, line in enumerate(lines)
                                         if (m := pattern.match(line.strip()))]
    signatures = []
    for n, (i, match) in enumerate(found):
        end = found[n + 1][0] if n + 1 < len(found) else len(lines)
        body = "\n".join(lines[i + 1:end])
        returns = re.search(r":returns:\s*(.*?)(?:\n\s*\n|\n\s*:|$)", body, re.S)
        entry = {"params": [_param(p) for p in _split_top(match.group(1))],
                 "returns": _clean(match.group(2).strip())}
        if returns:
            entry["returns_doc"] = _clean(" ".join(returns.group(1).split()))
        signatures.append(entry)
    return signatures


def _python_signature(func: Any) -> list[dict[str, Any]]:
    params = []
    for p in inspect.signature(func).parameters.values():
        entry = {"name": ("*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else "")
                 + p.name}
        if p.default is not p.empty:
            entry["default"] = repr(p.default)
        params.append(entry)
    return [{"params": params, "returns": "", "python": True}]


def _callable(name: str, obj: Any) -> dict[str, Any]:
    func = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
    if inspect.isfunction(func):        # added in Python by tensorrt/__init__.py
        signatures = _python_signature(func)
    else:
        signatures = _pybind_signatures(name, getattr(func, "__doc__", "") or "")
    return {"kind": "method", "signatures": signatures}


def _is_enum(cls: type) -> bool:
    return isinstance(cls.__dict__.get("__entries"), dict)   # how pybind11 keeps enum members


def _enum(cls: type) -> dict[str, Any]:
    return {"kind": "enum", "members": {k: int(v) for k, v in cls.__members__.items()}}


def _constant(obj: Any) -> dict[str, Any]:
    return {"kind": "constant", "type": _clean(type(obj).__qualname__), "repr": _clean(repr(obj))}


def _class(cls: type) -> dict[str, Any]:
    if _is_enum(cls):
        return _enum(cls)
    methods, properties, attributes = {}, {}, {}
    for attr in sorted(dir(cls)):
        dunder = attr.startswith("__") and attr.endswith("__")
        if (attr.startswith("_") and not dunder) or (dunder and attr not in _DUNDERS):
            continue
        owner = next((k for k in cls.__mro__ if attr in k.__dict__), None)
        if owner is None or owner is object or owner.__module__ == "pybind11_builtins":
            continue
        static = inspect.getattr_static(cls, attr)
        if isinstance(static, property):
            getter_doc = (static.fget.__doc__ or "") if static.fget else ""
            ret = re.search(r"^\(\w+: .*?\) -> (.*)$", getter_doc.strip().splitlines()[0]
                            if getter_doc.strip() else "")
            properties[attr] = {"writable": static.fset is not None,
                                "type": _clean(ret.group(1)) if ret else ""}
        elif isinstance(static, type):
            attributes[attr] = _class(static) if static.__qualname__.startswith(cls.__name__ + ".") \
                else {"kind": "class_ref", "name": _clean(static.__qualname__)}
        elif attr == "__init__" and type(static).__name__ == "wrapper_descriptor":
            continue   # pybind11's "No constructor defined!": see "constructible"
        elif callable(static) or isinstance(static, (staticmethod, classmethod)):
            entry = _callable(attr, static)
            if isinstance(static, staticmethod):
                entry["kind"] = "staticmethod"
            methods[attr] = entry
        elif static is not None:
            attributes[attr] = _constant(static)
    bases = [_clean(b.__qualname__) for b in cls.__bases__ if b.__module__ != "pybind11_builtins"
             and b is not object]
    return {"kind": "class", "bases": bases, "methods": methods, "properties": properties,
            "attributes": attributes, "constructible": "__init__" in methods}


def probe(expression: str, env: dict[str, Any]) -> dict[str, str]:
    try:
        result = repr(eval(expression, env))  # noqa: S307 - fixed expressions below
    except Exception as exc:  # the point is to record what the real module raises
        result = f"raises {type(exc).__name__}: {exc}"
    return {"expression": expression, "result": _clean(result)}


PROBE_SETUP = """
class Calib(trt.IInt8EntropyCalibrator2):
    def __init__(self):
        trt.IInt8EntropyCalibrator2.__init__(self)
"""
# behaviour the real module shows without libnvinfer (the stubs return NULL); the fake must agree
PROBES = [
    "trt.Builder(trt.Logger())", "trt.Runtime(trt.Logger())", "trt.Logger().min_severity",
    "trt.nptype(trt.bfloat16)", "trt.nptype(trt.float16)", "trt.DataType.HALF.itemsize",
    "trt.Dims([1, -1, 3]) == (1, -1, 3)", "tuple(trt.Dims([1, -1, 3]))", "str(trt.Dims([2, 3]))",
    "trt.BuilderFlag.FP16 == 0", "int(trt.BuilderFlag.TF32)", "str(trt.DataType.FLOAT)",
    "Calib().get_batch(['image'])", "Calib().get_algorithm()", "trt.volume([2, 3, 4])",
    "trt.Logger.WARNING is trt.ILogger.Severity.WARNING",
    # a list where a Dims is declared converts implicitly (set_shape(name, [..], [..], [..]))
    "(lambda d: (d.__setitem__(slice(0, 2), [7, 8]), d)[1])(trt.Dims([1, 2, 3]))",
]


def dump_module(module_name: str) -> dict[str, Any]:
    """Describe every public name of ``module_name`` (called in the subprocess)."""
    import importlib
    import warnings

    warnings.simplefilter("ignore")
    mod = importlib.import_module(module_name)
    names = {}
    for name in sorted(dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name)
        if inspect.ismodule(obj):
            continue
        if isinstance(obj, type):
            names[name] = _class(obj)
        elif inspect.isfunction(obj):
            names[name] = {"kind": "function", "signatures": _python_signature(obj)}
        elif callable(obj):
            names[name] = {"kind": "function", "signatures": _pybind_signatures(name, obj.__doc__)}
        else:
            names[name] = _constant(obj)
    env = {"trt": mod}
    exec(PROBE_SETUP, env)  # noqa: S102
    probes = [probe(e, env) for e in PROBES]
    return {"version": mod.__version__, "names": names, "probes": probes}


# ------------------------------------------------------------------ run by the user
def download_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--quiet", "--dest", str(dest), f"{PACKAGE}=={VERSION}"], check=True)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"pip download of {PACKAGE}=={VERSION} gave no wheel")
    return wheels[0]


def build_stubs(extension: Path, dest: Path) -> list[str]:
    """Stub libraries for each libnv* the extension needs, exporting every C symbol it binds."""
    needed = re.findall(r"\[(libnv[^\]]+)\]", subprocess.run(
        ["readelf", "-d", str(extension)], check=True, capture_output=True, text=True).stdout)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(extension)], check=True,
                               capture_output=True, text=True).stdout.split("\n")
    symbols = sorted(line.split()[-1] for line in undefined
                     if line.split()[:1] == ["U"] and "@" not in line
                     and not line.split()[-1].startswith(("Py", "_Py")))
    source = dest / "stub.c"
    source.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
    for lib in needed:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dest / lib), str(source)], check=True)
    return symbols


def snapshot(wheel: Path, workdir: Path) -> dict[str, Any]:
    bind = workdir / "bind"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(bind)
    stubs = workdir / "stubs"
    stubs.mkdir()
    symbols = build_stubs(bind / MODULE / "tensorrt.so", stubs)
    env = dict(os.environ, PYTHONPATH=str(bind),
               LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(stubs), os.environ.get("LD_LIBRARY_PATH")])))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--dump-module", MODULE],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"importing the bindings failed:\n{proc.stderr}")
    data = json.loads(proc.stdout)
    data["source"] = {"package": PACKAGE, "version": VERSION, "wheel": wheel.name,
                      "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
                      "stubbed_symbols": symbols,
                      "generated_by": "tests/support/trt_api_snapshot.py"}
    data["module"] = "tensorrt"
    return data


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="use this wheel instead of downloading it")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--dump-module", help=argparse.SUPPRESS)
    ns = parser.parse_args(args)
    if ns.dump_module:
        json.dump(dump_module(ns.dump_module), sys.stdout)
        return 0
    with tempfile.TemporaryDirectory(prefix="trt-api-") as tmp:
        workdir = Path(tmp)
        wheel = ns.wheel or download_wheel(workdir / "download")
        data = snapshot(wheel, workdir)
    ns.output.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{ns.output}: {len(data['names'])} names from {data['source']['wheel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
