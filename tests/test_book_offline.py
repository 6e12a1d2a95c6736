"""The offline check `make test` runs on the built book (tests/check_offline.py), on small synthetic sites."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import check_offline
from check_offline import check_site, is_remote, main, page_refs

MATHJAX = "_static/mathjax/tex-chtml.js"


def make_site(tmp_path: Path, pages: dict[str, str], files: tuple[str, ...] = (MATHJAX,)) -> Path:
    site = tmp_path / "html"
    for name in files:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text("/* local */", encoding="utf-8")
    for name, body in pages.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(f"<!DOCTYPE html><html><head>{body}</head><body></body></html>", encoding="utf-8")
    return site


def test_page_loading_mathjax_from_a_cdn_fails(tmp_path):
    site = make_site(tmp_path, {
        "index.html": '<script defer src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
    })
    problems = check_site(site, expect_mathjax=True)
    assert any("index.html" in p and "cdn.jsdelivr.net" in p and "network" in p for p in problems), problems
    assert any("no page loads MathJax" in p for p in problems), problems
    assert main([str(site), "--expect-mathjax"]) == 1


def test_page_loading_the_bundled_mathjax_passes(tmp_path, capsys):
    site = make_site(tmp_path, {
        "book/chapter.html": '<script defer src="../_static/mathjax/tex-chtml.js"></script>'
                             '<a href="https://arxiv.org/abs/1706.03762">the paper</a>'
                             '<link rel="canonical" href="https://example.org/book/chapter.html">',
        "index.html": '<link rel="stylesheet" href="_static/mathjax/tex-chtml.js?digest=1234">',
    })
    assert check_site(site, expect_mathjax=True) == []
    assert main([str(site), "--expect-mathjax"]) == 0
    assert "works offline" in capsys.readouterr().out


def test_mathjax_the_page_loads_must_exist_in_the_site(tmp_path):
    site = make_site(tmp_path, {"index.html": '<script src="_static/mathjax/tex-chtml.js"></script>'}, files=())
    problems = check_site(site, expect_mathjax=True)
    assert any("does not exist" in p and "tex-chtml.js" in p for p in problems), problems
    assert any("no page loads MathJax" in p for p in problems), problems


@pytest.mark.parametrize("body", [
    '<script src="//cdn.example.org/x.js"></script>',
    '<link rel="stylesheet" href="http://fonts.example.org/css">',
    '<link rel="preconnect" href="https://fonts.example.org">',
    '<link rel="icon" href="https://example.org/favicon.ico">',
    '<img src="https://example.org/figure.png">',
    '<img srcset="local.png 1x, https://example.org/figure@2x.png 2x">',
    '<style>@font-face { font-family: F; src: url("https://fonts.example.org/f.woff2"); }</style>',
    '<style>@import "https://example.org/theme.css";</style>',
    '<div style="background: url(//example.org/bg.png)"></div>',
    '<iframe src="https://www.youtube.com/embed/xyz"></iframe>',
    '<video src="clip.mp4" poster="https://example.org/poster.jpg"></video>',
])
def test_every_kind_of_remote_resource_fails(tmp_path, body):
    site = make_site(tmp_path, {"index.html": body}, files=("local.png", "clip.mp4"))
    problems = check_site(site)
    assert len(problems) == 1 and "from the network" in problems[0], problems


def test_remote_font_in_a_site_stylesheet_fails_and_a_comment_does_not(tmp_path):
    site = make_site(tmp_path, {"index.html": '<link rel="stylesheet" href="_static/theme.css">'},
                     files=("_static/theme.css",))
    sheet = site / "_static" / "theme.css"
    sheet.write_text('/* see https://example.org/docs */ @font-face { src: url(fonts/f.woff2); }', encoding="utf-8")
    assert check_site(site) == []
    sheet.write_text("@font-face { src: url('https://fonts.gstatic.com/s/f.woff2') format('woff2'); }",
                     encoding="utf-8")
    problems = check_site(site)
    assert problems == ["_static/theme.css: stylesheet loads https://fonts.gstatic.com/s/f.woff2 from the network"]


def test_templates_under_static_are_not_pages(tmp_path):
    site = make_site(tmp_path, {
        "index.html": "",
        "_static/webpack-macros.html": "<script src=\"{{ pathto('_static/x.js', 1) }}\"></script>",
    })
    assert check_site(site) == []


def test_root_relative_resources_fail_because_they_do_not_resolve_from_disk(tmp_path):
    site = make_site(tmp_path, {"index.html": '<script src="/_static/mathjax/tex-chtml.js"></script>'})
    problems = check_site(site)
    assert len(problems) == 1 and "root-relative" in problems[0], problems


def test_missing_or_empty_site_fails(tmp_path):
    assert "no such directory" in check_site(tmp_path / "nothing")[0]
    assert "no HTML page" in check_site(tmp_path)[0]


def test_is_remote():
    assert is_remote("https://x.org/a.js") and is_remote("HTTP://x.org") and is_remote("//x.org/a.js")
    assert not any(is_remote(u) for u in ("a.js", "../_static/a.js", "data:image/png;base64,AA", "#top",
                                          "file:///tmp/a.js", "mailto:a@b.c"))


def test_hyperlinks_are_not_resources():
    refs = page_refs('<a href="https://arxiv.org">p</a><link rel="next" href="https://x.org/n.html">'
                     '<input type="text" src="https://x.org/i.png"><script>var u = "https://x.org";</script>')
    assert refs.resources == []


def test_script_exit_status_is_what_make_test_reads(tmp_path):
    # `make test` runs `python tests/check_offline.py _build/html --expect-mathjax`.
    script = Path(check_offline.__file__)
    good = make_site(tmp_path / "good", {"index.html": '<script src="_static/mathjax/tex-chtml.js"></script>'})
    bad = make_site(tmp_path / "bad", {"index.html": '<script src="https://cdn.example.org/mathjax.js"></script>'})
    run = lambda site: subprocess.run([sys.executable, str(script), str(site), "--expect-mathjax"],
                                      capture_output=True, text=True, timeout=60)
    assert run(good).returncode == 0
    failed = run(bad)
    assert failed.returncode == 1 and "cdn.example.org" in failed.stdout
