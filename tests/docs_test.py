"""The README reads in one screen and points into docs/; no link points nowhere."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # markdown link targets, anchors dropped


def _links(path):
  text = open(path, encoding="utf-8").read()
  return [t for t in LINK.findall(text) if not re.match(r"[a-z]+://", t)]


def test_readme_is_short_and_every_docs_page_is_linked():
  readme = os.path.join(ROOT, "README.md")
  assert len(open(readme, encoding="utf-8").read()) < 8000
  linked = {os.path.normpath(t) for t in _links(readme)}
  pages = {os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
           if f.endswith(".md")}
  assert sorted(pages - linked) == [], "docs pages the README does not link"


def test_every_relative_link_points_to_a_file():
  files = [os.path.join(ROOT, "README.md")] + [
      os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
      if f.endswith(".md")]
  broken = [(os.path.relpath(f, ROOT), t) for f in files for t in _links(f)
            if not os.path.exists(os.path.join(os.path.dirname(f), t))]
  assert broken == []
