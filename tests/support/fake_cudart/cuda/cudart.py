"""Fake ``cuda.cudart``: the pre-12.6 name of ``cuda.bindings.runtime``, same module contents."""
from cuda.bindings.runtime import *  # noqa: F401,F403
