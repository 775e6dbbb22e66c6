"""Builds the optional compiled accelerator; everything else is in pyproject.toml.

The extension is an accelerator, never a requirement: without a C compiler (or with
AIODBENV_NO_COMPILE=1) the build is skipped and aiodbenv binds pthread through cffi's ABI mode.

A second, optional extension, ``aiodbenv._hot`` (source aiodbenv/_csrc/capi/hot.c), holds the
hot pin/unpin as CPython extension types; it is built the same way (a failed compile is a
warning; the Python hot path then runs).

The compiled modules use only CPython's stable ABI (cffi builds it ``py_limited_api``, hence
``_speedups.abi3.so``; ``_hot.abi3.so`` defines ``Py_LIMITED_API`` 3.11 itself), so the wheel
is tagged ``cp311-abi3``: one wheel for every CPython >= 3.11.
The build script aiodbenv/_speedups_build.py is a build input, not a runtime module: it stays in
the sdist (MANIFEST.in) and out of the wheel.
"""

import os
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

BUILD_SCRIPT = ("aiodbenv", "_speedups_build")


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a warning (the ABI fallback takes over)."""

    def run(self) -> None:
        for ext in self.extensions:
            ext.optional = True
        super().run()


class BuildPyWithoutBuildScript(build_py):
    """build_py that leaves the cffi build script out of the wheel (it imports cffi's builder
    and compiles C when run; nothing imports it at run time)."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != BUILD_SCRIPT]


class BdistWheelPureWithoutExtension(bdist_wheel):
    """bdist_wheel that tags the wheel py3-none-any when the accelerator failed to compile: a
    wheel without compiled code must not claim a Python ABI or a platform."""

    def get_tag(self) -> tuple[str, str, str]:
        if not self.root_is_pure and not any(Path(self.bdist_dir).rglob("*.so")):
            self.root_is_pure = True
        return super().get_tag()


kwargs: dict[str, Any] = {}
if os.environ.get("AIODBENV_NO_COMPILE") != "1":
    kwargs["cffi_modules"] = ["aiodbenv/_speedups_build.py:ffibuilder"]
    # The hot pin/unpin as CPython extension types (aiodbenv.mpool.hot); it calls the cffi
    # module's functions through pointers, so it has no bookkeeping C of its own. Its source
    # sits in a subdirectory: every top-level _csrc/*.c is part of the cffi module.
    kwargs["ext_modules"] = [
        Extension(
            "aiodbenv._hot",
            ["aiodbenv/_csrc/capi/hot.c"],
            py_limited_api=True,
            extra_compile_args=["-Werror=implicit-function-declaration"],
            # The module calls only the Python API, so the linker would record no libc at all;
            # auditwheel then cannot tell which libc it needs and refuses the wheel. Name it.
            extra_link_args=["-Wl,--no-as-needed", "-lc"],
        )
    ]
    # Tag the wheel for the stable ABI the extension is built against (cffi sets
    # py_limited_api on the Extension; the wheel tag is bdist_wheel's to say).
    kwargs["options"] = {"bdist_wheel": {"py_limited_api": "cp311"}}

setup(
    cmdclass={
        "bdist_wheel": BdistWheelPureWithoutExtension,
        "build_ext": OptionalBuildExt,
        "build_py": BuildPyWithoutBuildScript,
    },
    **kwargs,
)
