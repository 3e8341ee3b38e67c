"""pytest fixtures that swap in the fake TensorRT and fake CUDA runtime for one test.

    from support.trt_fakes import fake_cuda, fake_trt  # noqa: F401  (fixtures)

    def test_something(fake_trt, fake_cuda):
        fake_trt.faults.execute_fails = True
        ...
        fake_cuda._fake.assert_clean()

Import this module as ``support.trt_fakes`` (tests/ is on sys.path under pytest): it uses
the ``support.fake_tensorrt`` package, and a second copy imported under another name would
keep its own faults.

``fake_cuda`` is the fake ``cuda.bindings.runtime`` module (``cuda.cudart`` too): its
folder goes first on ``sys.path`` and every ``cuda`` module is evicted from ``sys.modules``
for the test, then put back. ``fake_trt`` (which brings ``fake_cuda``) is the fake
``tensorrt`` package: ``import tensorrt`` finds it through a meta-path finder, which raises
``fake_trt.faults.import_error`` instead when that is set. Both reset the project's caches
of those libraries (``cuda_memory._api``, ``tensorrt_runner._trt_logger``).
``break_tensorrt_import(AttributeError(...))`` makes the next ``import tensorrt`` fail as a
broken install does.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any, Iterator

import pytest

from . import fake_tensorrt
from .fake_cudart import SYS_PATH_ENTRY as CUDA_PATH


def _evict(prefix: str) -> dict[str, ModuleType]:
    """Remove ``prefix`` and its submodules from sys.modules; what was removed."""
    gone = {name: module for name, module in sys.modules.items()
            if name == prefix or name.startswith(prefix + ".")}
    for name in gone:
        del sys.modules[name]
    return gone


def _reset_project_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        from engines.runners import cuda_memory, tensorrt_runner
    except ImportError:
        return
    monkeypatch.setattr(cuda_memory, "_api", None)
    monkeypatch.setattr(tensorrt_runner, "_trt_logger", None)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake ``cuda.bindings.runtime``, fresh (one healthy Orin, nothing allocated)."""
    saved = _evict("cuda")
    monkeypatch.syspath_prepend(str(CUDA_PATH))
    try:
        import cuda.bindings.runtime as runtime

        assert hasattr(runtime, "_fake"), f"the real cuda-python was imported: {runtime.__file__}"
        _reset_project_caches(monkeypatch)
        yield runtime
    finally:
        _evict("cuda")
        sys.modules.update(saved)


class _TensorRTFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``import tensorrt`` to the fake package, or fails as a broken install would."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(fullname, self) if fullname == "tensorrt" else None

    def create_module(self, spec: Any) -> ModuleType:
        return fake_tensorrt

    def exec_module(self, module: ModuleType) -> None:
        if fake_tensorrt.faults.import_error is not None:
            raise fake_tensorrt.faults.import_error


@pytest.fixture
def fake_trt(fake_cuda: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake ``tensorrt`` package (``.faults``, ``.messages``), over the fake CUDA runtime."""
    fake_tensorrt.reset()
    saved = _evict("tensorrt")
    monkeypatch.setattr(sys, "meta_path", [_TensorRTFinder(), *sys.meta_path])
    _reset_project_caches(monkeypatch)
    try:
        yield fake_tensorrt
    finally:
        _evict("tensorrt")
        sys.modules.update(saved)
        fake_tensorrt.reset()


def break_tensorrt_import(error: BaseException) -> None:
    """Make the next ``import tensorrt`` raise ``error`` (with the ``fake_trt`` fixture)."""
    fake_tensorrt.faults.import_error = error
    _evict("tensorrt")
