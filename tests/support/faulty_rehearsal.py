"""``python -m edge.rehearsal`` whose analysis crashes the process (SIGSEGV) on images whose
path contains ``CRASH``: an image that kills the analysis in native code, for the tests."""
import ctypes
import sys

import edge.analysis
from edge import rehearsal

_prepare = edge.analysis.Analyzer.prepare


def _crashing_prepare(self, path_or_ds):
    if "CRASH" in str(path_or_ds):
        ctypes.string_at(0)
    return _prepare(self, path_or_ds)


edge.analysis.Analyzer.prepare = _crashing_prepare

if __name__ == "__main__":
    sys.exit(rehearsal.main())
