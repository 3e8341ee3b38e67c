"""Memoised IOD look-ups for highdicom: the same answers, computed once per SOP class.

highdicom asks "does this IOD have attribute X / pixel data?" by walking the standard's
module tables on every call: several times per object we build (ContentDate, ContentTime,
NumberOfFrames of each referenced image, pixel data of each referenced image), about a
tenth of the time an SR takes to build. The tables are static data shipped with highdicom,
so each answer depends only on its arguments; ``install()`` wraps the two functions with a
cache wherever highdicom (0.28) imported them. Nothing else changes, so the objects stay
byte-identical.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys

logger = logging.getLogger(__name__)

#: highdicom modules that imported the look-ups by name (highdicom 0.28); any other loaded
#: highdicom module holding them is patched as well
_USERS = ("highdicom._standard_utils", "highdicom.base", "highdicom.base_content", "highdicom.content",
          "highdicom.image", "highdicom.sr.content", "highdicom.sc.sop", "highdicom.pr.sop")
_installed = False


def _cached(function):
    @functools.lru_cache(maxsize=256)
    def lookup(args: tuple, named: tuple):
        return function(*args, **dict(named))

    def plain(value):
        if isinstance(value, (list, tuple)):
            return tuple(plain(v) for v in value)
        return str(value) if isinstance(value, str) else value

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            key = tuple(plain(a) for a in args)
            named = tuple(sorted((k, plain(v)) for k, v in kwargs.items()))
            hash((key, named))
        except TypeError:
            return function(*args, **kwargs)
        return lookup(key, named)

    wrapper.__wrapped_uncached__ = function
    return wrapper


def install() -> None:
    """Replace the two look-ups with cached ones (once; idempotent)."""
    global _installed
    if _installed:
        return
    from highdicom import _standard_utils as std
    replacements = {name: _cached(getattr(std, name))
                    for name in ("is_attribute_in_iod", "does_iod_have_pixel_data") if hasattr(std, name)}
    for module_name in _USERS:
        try:
            importlib.import_module(module_name)
        except ImportError:
            continue
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("highdicom"):
            continue
        for name, cached in replacements.items():
            if getattr(module, name, None) is cached.__wrapped_uncached__:
                setattr(module, name, cached)
    _installed = True
