"""Great Expectations Data Docs that open styled with no network, from a folder or the MLflow run's
artifacts.

GX's pages link Bootstrap, Font Awesome, jQuery, bootstrap-table and Vega from CDNs; without
them the index's tables (built by script) stay empty and the pages unstyled. `make_offline`
removes every http(s) stylesheet, script and image and inlines a stylesheet for the classes the pages
use and a script that builds the index's tables and shows each chart as the table of its data
(data_docs_offline.css/.js beside this file). Everything else a page references is relative
(GX's static/ folder), so the folder works as it is uploaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

_HERE = Path(__file__).parent
REMOTE_ASSET = re.compile(
    r"<link\b[^>]*\bhref=[\"']https?://[^>]*>"
    r"|<script\b[^>]*\bsrc=[\"']https?://[^>]*>\s*</script>"
    r"|<img\b[^>]*\bsrc=[\"']https?://[^>]*>",  # GX's logo, fetched from its web bucket
    re.IGNORECASE,
)
# GX computes the favicon's relative path from the suite name and misses on run names with folders
FAVICON = re.compile(r"<link\b[^>]*\brel=[\"']shortcut icon[\"'][^>]*>", re.IGNORECASE)
MARK = "<!-- onerec-fp8: offline assets -->"


def make_offline(docs_dir: str | Path) -> int:
    """Rewrite every page under docs_dir to need no network; returns the number of pages."""
    inline = (f"{MARK}\n<style>\n{(_HERE / 'data_docs_offline.css').read_text()}</style>\n"
              f"<script>\n{(_HERE / 'data_docs_offline.js').read_text()}</script>\n")
    pages = sorted(Path(docs_dir).rglob("*.html"))
    for page in pages:
        html = page.read_text(encoding="utf-8")
        if MARK in html:
            continue
        html = FAVICON.sub("", REMOTE_ASSET.sub("", html))
        head_end = html.lower().find("</head>")
        html = html[:head_end] + inline + html[head_end:] if head_end >= 0 else inline + html
        page.write_text(html, encoding="utf-8")
    return len(pages)


def offline_problems(docs_dir: str | Path) -> list[str]:
    """What keeps the pages under docs_dir from opening styled offline: an http(s) stylesheet,
    script or image, or a relative reference to a file not in the folder (empty: none)."""
    docs_dir = Path(docs_dir)
    problems = []
    for page in sorted(docs_dir.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        name = page.relative_to(docs_dir).as_posix()
        problems += [f"{name}: loads {' '.join(tag.split())[:120]}" for tag in REMOTE_ASSET.findall(html)]
        if MARK not in html:
            problems.append(f"{name}: without the inline stylesheet")
        for ref in re.findall(r"\b(?:src|href)=[\"']([^\"'#?]+)", html, re.IGNORECASE):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", ref, re.IGNORECASE) and not (page.parent / unquote(ref)).exists():
                problems.append(f"{name}: {ref} is missing")
    return problems
