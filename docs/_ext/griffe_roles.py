"""A griffe extension for the docs site: turn the docstrings' Sphinx roles into links.

aiodbenv's docstrings are written for Sphinx (``:class:`~aiodbenv.Env```, ``:meth:`close```);
mkdocstrings renders docstrings as Markdown, where a role would show up as raw text. Before
rendering, each role becomes an autorefs cross-reference to the object's public page entry
(``[`Env`][aiodbenv.Env]``) when the target is part of the documented API, and plain code
(```Env```) otherwise. ``double backticks`` need nothing: Markdown reads them as code too.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|meth|func|attr|data|mod|exc|obj):`(~?)([\w.]+)(\(\))?`")


class SphinxRoles(griffe.Extension):
    """Rewrites roles in every docstring of the ``aiodbenv`` package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.path != "aiodbenv":
            return
        public = self._public(pkg)
        for obj in self._walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(
                    lambda m, o=obj: self._ref(m, o, loader, public), obj.docstring.value
                )

    @staticmethod
    def _public(pkg: griffe.Module) -> dict[str, str]:
        """Canonical path -> the path it is documented under on the API page."""
        out = {"aiodbenv": "aiodbenv", "aiodbenv.errors": "aiodbenv.errors"}
        errors = pkg["errors"]
        for name in pkg.exports or []:
            member = pkg[name]
            canonical = member.canonical_path
            if canonical.startswith("aiodbenv.errors."):
                out[canonical] = f"aiodbenv.errors.{name}"
            elif name != "errors":
                out[canonical] = f"aiodbenv.{name}"
        for name in errors.exports or []:
            out.setdefault(f"aiodbenv.errors.{name}", f"aiodbenv.errors.{name}")
        return out

    def _walk(self, obj: griffe.Object) -> list[griffe.Object]:
        found = [obj]
        for member in obj.members.values():
            if member.is_alias:
                continue  # documented where it is defined
            found.extend(self._walk(member))  # type: ignore[arg-type]
        return found

    @staticmethod
    def _resolve(target: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str | None:
        scopes = [""]
        scope: griffe.Object | None = obj
        while scope is not None:
            scopes.append(scope.path + ".")
            scope = scope.parent
        scopes.append("aiodbenv.")
        for prefix in scopes:
            try:
                found = loader.modules_collection.get_member(prefix + target)
                return str(found.canonical_path)
            except Exception:  # not there, or an alias to something not loaded
                continue
        return None

    def _ref(
        self,
        m: re.Match[str],
        obj: griffe.Object,
        loader: griffe.GriffeLoader,
        public: dict[str, str],
    ) -> str:
        _, tilde, target, call = m.groups()
        shown = (target.rsplit(".", 1)[-1] if tilde else target) + (call or "")
        canonical = self._resolve(target, obj, loader)
        if canonical is not None:
            parts = canonical.split(".")
            for i in range(len(parts), 0, -1):
                head = ".".join(parts[:i])
                if head in public:
                    rest = parts[i:]
                    if any(p.startswith("_") for p in rest):
                        break  # a private member: not on the page
                    return f"[`{shown}`][{'.'.join([public[head], *rest])}]"
        return f"`{shown}`"
