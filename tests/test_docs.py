"""The README routes and its links hold: it stays short, opens with the two commands CI runs, and every relative link
in it and in docs/ reaches a file (and, with ``#anchor``, a heading of that file as GitHub names it).

A moved page or a renamed heading breaks a link silently on GitHub; here it fails a test that takes milliseconds.
"""

from __future__ import annotations

import pathlib
import re
from urllib.parse import unquote

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 260

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked: a link written inside code is not a link."""
    kept, fence = [], None
    for line in text.split("\n"):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)[0] * len(opened.group(1))
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            kept.append(line)
    return CODE_SPAN.sub(" ", "\n".join(kept))


def links(text: str) -> list[str]:
    """Every link and image target in a markdown text, inline or as a reference definition."""
    body = prose(text)
    return INLINE_LINK.findall(body) + REFERENCE_DEFINITION.findall(body)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, everything but word characters (letters, digits,
    ``_``), ``-`` and spaces dropped, each space a hyphen (GitHub's ``downcase.gsub(/[^\p{Word}\- ]/u, '').tr(' ',
    '-')``). ``## dpo-dist against TRL's DPOTrainer`` -> ``dpo-dist-against-trls-dpotrainer``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text, not its target
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors of a markdown file's headings; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose(path.read_text(encoding="utf-8")).split("\n"):
        heading = HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def test_slugs_follow_github():
    """Punctuation goes, ``_`` and ``-`` stay, and every space is a hyphen, so `` + `` becomes ``--``."""
    assert slug("dpo-dist against TRL's DPOTrainer") == "dpo-dist-against-trls-dpotrainer"
    assert slug("Data at scale: load + validate + tokenize, cold and cached") == \
        "data-at-scale-load--validate--tokenize-cold-and-cached"
    assert slug("`train.keep_freed_memory` and `zero_memory.py`") == "trainkeep_freed_memory-and-zero_memorypy"
    assert slug("Preemption, kills, resume") == "preemption-kills-resume"


def test_links_in_code_are_not_links():
    text = "see [a](a.md) and `[b](b.md)`\n```\n[c](c.md)\n```\n![d](d.png \"title\")\n[e]: e.md\n"
    assert links(text) == ["a.md", "d.png", "e.md"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    """A relative link names a file that exists; with ``#anchor``, into a markdown file, a heading there."""
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if not is_relative(target):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part.split("?")[0])
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_routes_to_every_docs_page():
    """Every page under docs/ is reachable from the README's map, so none is orphaned."""
    targets = {(README.parent / t.partition("#")[0]).resolve() for t in links(README.read_text(encoding="utf-8"))
               if is_relative(t) and t.partition("#")[0]}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in targets]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to a page under docs/"


def test_readme_opens_with_the_two_commands():
    """CI (.ci/run) runs the second line of the README's first code block: that block is the setup-and-run command
    and the setup-and-test command."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, "README.md has no code block"
    commands = block.group(1).strip("\n").split("\n")
    assert len(commands) == 2, commands
    assert all(command.startswith("python3 -m pip install") for command in commands), commands
    assert "pytest" in commands[1]
