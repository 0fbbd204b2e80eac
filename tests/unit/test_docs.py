"""The README stays a first screen (≤ 15 KB) and every relative link in it and in docs/ resolves,
to a file and, with a #fragment, to a heading of that file (GitHub's anchor rule)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*.html"))]
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HTML_LINK = re.compile(r"""(?:src|href)=['"]([^'"]+)['"]""")


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    text = page.read_text()
    if page.suffix == ".md":
        text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # code blocks hold commands, not links
        text = re.sub(r"`[^`\n]*`", "", text)
        return MD_LINK.findall(text)
    return HTML_LINK.findall(text)


def test_readme_is_at_most_15_kb():
    assert len((ROOT / "README.md").read_bytes()) <= 15_000


def test_readme_holds_the_test_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^(uv run pytest[^\n]*)$", ci, re.M).group(1)
    assert command in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for link in links(page):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} -> {target} does not exist"
        if fragment:
            assert target.suffix == ".md" and fragment in anchors(target), f"{page.name}: no heading #{fragment} in {target.name}"


def test_the_anchor_rule_matches_github():
    page = ROOT / "docs" / "performance.md"
    assert "train-step-against-a-users-diffusers-step-and-compile-on-cpu" in anchors(page)
