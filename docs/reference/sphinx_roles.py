"""A Griffe extension for the API reference: the package's docstrings use a few Sphinx idioms,
which this turns into their Markdown equivalents before mkdocstrings renders them.

- ``:class:`~a.b.C```, ``:func:`name```, ``:meth:`C.m```, ``:mod:``, ``:attr:``, ``:exc:``,
  ``:data:``, ``:obj:``: a cross-reference to the object (a leading ``~`` shows only its last
  name). Relative names are resolved in the docstring's scope. The link is optional: a target
  that is not rendered anywhere (a private helper) shows as plain code, never as a warning.
- ``text::`` before an indented literal block: ``text:`` (the block stays a code block).
- a reStructuredText simple table (rows between ``=====  =====`` rules, with or without a header;
  a row whose first cell is blank continues the row above): a Markdown table.

Loaded by mkdocs.yml (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import html
import itertools
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj):`(~?)([\w.]+)`")
LITERAL = re.compile(r"(\S)::\n(\s*\n)")
RULE = re.compile(r"^ *=+( +=+)+ *$")


def _target(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` as seen from ``obj``'s docstring, or None."""
    root = obj.package.name
    if name == root or name.startswith(root + "."):
        return name  # already a full path
    first, _, rest = name.partition(".")
    scope: Any = obj
    while scope is not None:
        try:
            path = scope.resolve(first)
        except Exception:
            scope = scope.parent
            continue
        return f"{path}.{rest}" if rest else path
    return None


def _rewrite(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match[str]) -> str:
        short, name = match.groups()
        title = html.escape(name.rsplit(".", 1)[-1] if short else name)
        path = _target(obj, name)
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{html.escape(path)}" optional><code>{title}</code></autoref>'

    return _tables(LITERAL.sub(r"\1:\n\2", ROLE.sub(link, text)))


def _tables(text: str) -> str:
    """Every reStructuredText simple table of ``text`` as a Markdown table."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        rules = [j for j in range(i, len(lines)) if RULE.match(lines[j])][:3]
        if len(rules) < 2 or rules[0] != i:
            out.append(lines[i])
            i += 1
            continue
        if len(rules) == 3 and not lines[rules[1] + 1].strip():
            rules.pop()  # a table with no header: the second rule ends it
        starts = [m.start() for m in re.finditer(r"=+", lines[i])]
        spans = list(zip(starts, [*starts[1:], None], strict=True))
        table = []
        if len(rules) == 2:
            table += ["|" + "  |" * len(starts), "|" + "---|" * len(starts)]
        for first, last in itertools.pairwise(rules):  # the header, then the body
            rows: list[list[str]] = []
            for line in lines[first + 1 : last]:
                cells = [line[a:b].strip() for a, b in spans]
                if rows and not cells[0]:  # a continuation line
                    joined = zip(rows[-1], cells, strict=True)
                    rows[-1] = [f"{old} {new}".strip() for old, new in joined]
                elif line.strip():
                    rows.append(cells)
            table += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            if first == rules[0] and len(rules) == 3:
                table.append("|" + "---|" * len(starts))
        out += table
        i = rules[-1] + 1
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of a package once the whole package is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        todo: list[griffe.Object] = [pkg]
        while todo:
            obj = todo.pop()
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, obj.docstring.value)
            todo.extend(member for member in obj.members.values() if not member.is_alias)
