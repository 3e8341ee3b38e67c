"""Fake ``cuda`` package (tests/support/fake_cudart): shadows cuda-python while a test runs."""
