"""Builds the optional compiled pthread binding; everything else is in pyproject.toml.

The extension is an accelerator, never a requirement: without a C compiler (or with
AIODBENV_NO_COMPILE=1) the build is skipped and aiodbenv binds pthread through cffi's ABI mode.
"""

import os

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a warning (the ABI fallback takes over)."""

    def run(self) -> None:
        for ext in self.extensions:
            ext.optional = True
        super().run()


kwargs = {}
if os.environ.get("AIODBENV_NO_COMPILE") != "1":
    kwargs["cffi_modules"] = ["aiodbenv/_speedups_build.py:ffibuilder"]

setup(cmdclass={"build_ext": OptionalBuildExt}, **kwargs)
