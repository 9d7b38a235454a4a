"""MkDocs hook: render the docstrings' Sphinx roles (``:func:`open_repo```) as plain code.

The docstrings are read by help() and IDEs as well as by mkdocstrings, so they keep the roles;
in the built pages ``:func:<code>~repo_stream.open_repo</code>`` becomes ``<code>open_repo</code>``
and ``:meth:<code>Repo.next_chunk <repo_stream.Repo.next_chunk></code>`` ``<code>Repo.next_chunk</code>``.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj|const):<code>([^<]*?)(?:\s+&lt;[^<]*?&gt;)?</code>")


def _plain(match: re.Match[str]) -> str:
    text = match.group(1)
    if text.startswith("~"):
        text = text[1:].rpartition(".")[2]
    return f"<code>{text}</code>"


def on_page_content(html: str, **_: Any) -> str:
    """Strip the roles from a page's HTML (mkdocs calls this for every page)."""
    return _ROLE.sub(_plain, html)
