"""Which data-plane kernel this process runs: the C one (common/_kernel.c,
built by ``pip install -e .``) or the pure-Python reference.

``MYCELIUM_NATIVE=0`` picks the reference; so does a build that failed
(no compiler or no libssl-dev: the extension is optional). Either way
``NAME`` says which ran and ``REASON`` why, and tund logs it in one line
at start. ``MYCELIUM_KERNEL_SO`` loads the extension from another file
(``make asan`` points it at an AddressSanitizer build).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

from cryptography.exceptions import InvalidTag

ENV = "MYCELIUM_NATIVE"
SO_ENV = "MYCELIUM_KERNEL_SO"


class SegmentError(ValueError):
    """A TCP super packet that cannot be cut (gso.py raises a subclass)."""


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(ENV, "1") == "0":
        return None, f"{ENV}=0"
    try:
        path = os.environ.get(SO_ENV)
        if path:
            spec = importlib.util.spec_from_file_location("common._kernel", path)
            if spec is None or spec.loader is None:
                return None, f"cannot load {path}"
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            from common import _kernel as mod  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:
        return None, f"not built ({exc})"
    mod.configure(InvalidTag, os.urandom, SegmentError)
    return mod, mod.__file__ or "built in"


kernel, REASON = _load()
NAME = "native" if kernel is not None else "python"


def fields(name: str) -> type:
    """The kernel's base class that keeps the fields it reads in slots
    (``PlaneFields``, ``RingFields``, ``OutFields``, ``QueueFields``:
    _kernel.c), or ``object`` without the kernel. The classes the kernel
    reads on every call derive from it; to Python they are attributes."""
    base = getattr(kernel, name, None) if kernel is not None else None
    return base if isinstance(base, type) else object


def built() -> bool:
    """Is there a compiled kernel next to this file (whether in use or not)?"""
    here = os.path.dirname(os.path.abspath(__file__))
    return any(f.startswith("_kernel.") and f.endswith(".so") for f in os.listdir(here))


def describe() -> str:
    """One line for the log: which kernel and why."""
    if kernel is not None:
        gcm = "OpenSSL's provider functions" if getattr(kernel, "GCM_BACKEND", "") == "provider" else "EVP"
        return f"data-plane kernel: native ({REASON}; AES-GCM through {gcm})"
    return f"data-plane kernel: pure Python ({REASON})"
