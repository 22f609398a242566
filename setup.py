"""Only the C data-plane kernel lives here (everything else is in setup.cfg).

The extension is optional: without a compiler or libssl-dev the build
skips it and the services run the pure-Python reference (common/native.py
says so in one line).
"""

import os

from setuptools import Extension, setup

CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
CFLAGS += os.environ.get("MYCELIUM_KERNEL_CFLAGS", "").split()

setup(
    ext_modules=[
        Extension(
            "common._kernel",
            ["common/_kernel.c"],
            libraries=["crypto"],
            extra_compile_args=CFLAGS,
            extra_link_args=os.environ.get("MYCELIUM_KERNEL_LDFLAGS", "").split(),
            optional=True,
        )
    ]
)
