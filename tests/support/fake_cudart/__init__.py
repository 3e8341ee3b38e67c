"""A stand-in for cuda-python 12 (``cuda.bindings.runtime``, and ``cuda.cudart`` as before 12.6).

Put :data:`SYS_PATH_ENTRY` (this folder) first on ``sys.path``, with every ``cuda`` module
evicted from ``sys.modules``, and ``import cuda.bindings.runtime`` gives the fake in
``cuda/bindings/runtime.py``; tests/support/trt_fakes.py does that for one test. This package
itself is only a marker: import the fake through the ``cuda`` name, never as
``fake_cudart.cuda...`` (that would be a second copy with its own memory).
"""
from pathlib import Path

SYS_PATH_ENTRY = Path(__file__).resolve().parent
