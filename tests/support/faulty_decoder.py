"""The appliance's decoder process with codec faults on demand, for tests of the isolation.

Runs ``edge.decoder``'s child loop, but an image whose file name contains ``SEGFAULT``,
``HANG`` or ``ALLOC`` makes the "codec" crash the process, never return, or ask for far
more memory than the process may use: the three faults of native codecs that no Python
``except`` can catch. Every other image is decoded for real.
"""
import ctypes
import sys
import time

import numpy as np

import edge.imaging
from edge import decoder

_real = edge.imaging.load_for_models


def _faulty(path, **kwargs):
    name = str(path)
    if "SEGFAULT" in name:
        ctypes.string_at(0)            # read address 0: SIGSEGV
    if "HANG" in name:
        while True:
            time.sleep(1)
    if "ALLOC" in name:
        return np.ones((1 << 36,), dtype=np.uint8)   # 64 GiB
    return _real(path, **kwargs)


edge.imaging.load_for_models = _faulty

if __name__ == "__main__":
    sys.exit(decoder.main())
