"""Build of the optional C accelerator; everything else is in pyproject.toml.

``bonzo._speedups`` makes the DATA scan one pass instead of several. Bonzo
works the same without it (the pure-Python scan is the reference), so a
machine with no C compiler still installs: the build is optional unless
``BONZO_EXTENSION=1`` asks for it (CI does, so that the C path is tested).
``BONZO_EXTENSION=0`` skips it.
"""

import os

from setuptools import Extension, setup

wanted = os.environ.get("BONZO_EXTENSION", "")
ext_modules = []
if wanted != "0":
    ext_modules.append(
        Extension("bonzo._speedups", sources=["bonzo/_speedups.c"], optional=wanted != "1")
    )

setup(ext_modules=ext_modules)
