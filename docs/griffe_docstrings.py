"""A griffe extension for the API reference (mkdocs.yml loads it; it is not part of the package).

cuba's docstrings are prose written for ``help()`` and a plain-text reader, with two habits that
Python-Markdown renders badly:

* Sphinx roles such as :func:`name` or :data:`NAME`, which would show as ":func:" followed by the
  name; they become plain code spans, `name`;
* nested lists and list continuations indented by two spaces, which Python-Markdown (it needs four)
  flattens or glues into the next paragraph; an indentation of one to three spaces is doubled,
  which keeps each line's nesting level and makes it one Python-Markdown understands (four or
  more spaces start a code block, which is left as it is);
* a list that starts right under a line of text, which Python-Markdown reads as more of that
  paragraph; a blank line is put before such a first item.

Only the text handed to the renderer changes; the source files are not touched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|data|attr|mod|obj|exc|const):`~?([^`]+)`")
INDENT = re.compile(r"^( {1,3})(?=\S)", re.MULTILINE)  # list indentation; 4+ spaces is a code block, kept
ITEM = re.compile(r"^ {0,3}[*-] \S")  # a list item, not indented as code


def markdown_friendly(text: str) -> str:
    """Sphinx roles to code spans, a blank line before a list item that follows a line of text,
    and a leading indentation of one to three spaces doubled."""
    text = ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    lines: list[str] = []
    for line in text.split("\n"):
        if ITEM.match(line) and lines and lines[-1].strip() and not ITEM.match(lines[-1]):
            lines.append("")
        lines.append(line)
    return INDENT.sub(lambda m: m.group(1) * 2, "\n".join(lines))


class MarkdownFriendlyDocstrings(griffe.Extension):
    """Rewrite each object's docstring with :func:`markdown_friendly` once it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_friendly(obj.docstring.value)
