"""Check that a built HTML site works without network: ``python tests/check_offline.py _build/html``.

A page fails the check when it makes the browser fetch something from another host: a script,
stylesheet, icon, font, image, media file or frame given by an ``http(s)://`` or protocol-relative
(``//host/...``) URL, in an HTML attribute, in a ``<style>`` element or ``style`` attribute, or in a
stylesheet of the site (``url(...)``, ``@import``). Hyperlinks (``<a href>``, ``<link rel="canonical">``
and the like) are not fetched when the page loads and are allowed. Every local resource a page loads
must exist in the site, and with ``--expect-mathjax`` at least one page must load MathJax from the site.
Pages are the ``.html`` files outside ``_static/``; stylesheets are every ``.css`` file of the site.

Exit status 0 when the site passes, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Attributes whose URL the browser fetches while loading the page, per element.
FETCHED_ATTRS: dict[str, tuple[str, ...]] = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "track": ("src",),
    "iframe": ("src",),
    "frame": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "input": ("src",),
    "image": ("href", "xlink:href"),  # SVG
    "feimage": ("href", "xlink:href"),  # SVG
}
# <link rel=...> values whose href is fetched (or connected to) while loading the page.
FETCHED_LINK_RELS = {
    "stylesheet", "icon", "shortcut", "apple-touch-icon", "apple-touch-icon-precomposed", "mask-icon",
    "preload", "prefetch", "modulepreload", "manifest", "dns-prefetch", "preconnect", "prerender",
}
CSS_URL = re.compile(r"""url\(\s*(['"]?)(.*?)\1\s*\)|@import\s+(['"])(.*?)\3""", re.IGNORECASE | re.DOTALL)
CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)


def is_remote(url: str) -> bool:
    """True for a URL that names another host: ``http://``, ``https://`` or protocol-relative ``//``."""
    url = url.strip()
    if url.startswith("//"):
        return True
    scheme = re.match(r"^([a-z][a-z0-9+.-]*)://", url, re.IGNORECASE)
    return scheme is not None and scheme.group(1).lower() != "file"


def srcset_urls(value: str) -> list[str]:
    return [part.strip().split()[0] for part in value.split(",") if part.strip()]


def css_urls(css: str) -> list[str]:
    css = CSS_COMMENT.sub("", css)
    return [(m.group(2) if m.group(2) is not None else m.group(4)).strip() for m in CSS_URL.finditer(css)]


@dataclass
class PageRefs:
    """What one page makes the browser load."""

    resources: list[tuple[str, str]] = field(default_factory=list)  # (what, url)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs = PageRefs()
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        tag = tag.lower()
        values = {name.lower(): (value or "") for name, value in attrs}
        for name in FETCHED_ATTRS.get(tag, ()):
            if tag == "input" and values.get("type", "").lower() != "image":
                continue
            if name in values and values[name].strip():
                urls = srcset_urls(values[name]) if name == "srcset" else [values[name]]
                self.refs.resources.extend((f"<{tag} {name}>", url) for url in urls)
        if tag == "link" and values.get("href", "").strip():
            rels = set(values.get("rel", "").lower().split())
            if rels & FETCHED_LINK_RELS:
                self.refs.resources.append((f"<link rel={values.get('rel')}>", values["href"]))
        if "style" in values:
            self.refs.resources.extend((f"<{tag} style>", url) for url in css_urls(values["style"]))
        if tag == "style":
            self._in_style = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag.lower() == "style":
            self._in_style = False

    def handle_endtag(self, tag: str) -> None:
        if tag.lower() == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.refs.resources.extend(("<style>", url) for url in css_urls(data))


def page_refs(html: str) -> PageRefs:
    collector = _Collector()
    collector.feed(html)
    collector.close()
    return collector.refs


def _local_target(site: Path, page: Path, url: str) -> Path | None:
    """The file a local URL points to, or None for a URL that loads nothing from disk (data:, #...)."""
    parts = urlsplit(url.strip())
    if parts.scheme or not parts.path:
        return None  # data:, blob:, javascript:, about:, or a bare #fragment / ?query
    path = unquote(parts.path)
    return (site / path.lstrip("/")) if path.startswith("/") else (page.parent / path)


def check_site(site: Path, expect_mathjax: bool = False) -> list[str]:
    """Every problem that stops ``site`` from working offline, one sentence each (empty: it passes)."""
    site = Path(site)
    problems: list[str] = []
    if not site.is_dir():
        return [f"{site}: no such directory (build the book first)"]
    # Pages are the HTML files outside _static/ (themes keep Jinja templates there: not pages).
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)
    if not pages:
        return [f"{site}: no HTML page"]
    mathjax_pages = 0
    for page in pages:
        rel = page.relative_to(site)
        for what, url in page_refs(page.read_text(encoding="utf-8", errors="replace")).resources:
            if is_remote(url):
                problems.append(f"{rel}: {what} loads {url} from the network")
                continue
            if url.strip().startswith("/"):
                problems.append(f"{rel}: {what} {url} is root-relative and does not resolve from disk")
                continue
            target = _local_target(site, page, url)
            if target is None:
                continue
            if not target.is_file():
                problems.append(f"{rel}: {what} {url} does not exist in the site")
            elif what.startswith("<script") and "mathjax" in url.lower():
                mathjax_pages += 1
    for sheet in sorted(site.rglob("*.css")):
        rel = sheet.relative_to(site)
        for url in css_urls(sheet.read_text(encoding="utf-8", errors="replace")):
            if is_remote(url):
                problems.append(f"{rel}: stylesheet loads {url} from the network")
    if expect_mathjax and mathjax_pages == 0:
        problems.append(f"{site}: no page loads MathJax from the site itself")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site, e.g. _build/html")
    parser.add_argument("--expect-mathjax", action="store_true",
                        help="also fail unless some page loads MathJax from the site")
    args = parser.parse_args(argv)
    problems = check_site(args.site, expect_mathjax=args.expect_mathjax)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.site} does not work offline: {len(problems)} problem(s) above")
        return 1
    print(f"{args.site} works offline: no page loads anything from the network")
    return 0


if __name__ == "__main__":
    sys.exit(main())
