"""Fake ``cuda.bindings`` (tests/support/fake_cudart): only ``runtime`` is provided."""

__version__ = "12.6.2"   # what a JetPack 6.1 image pairs with CUDA 12.6
