"""The front door and the docs stay what they claim: a README a newcomer reads in ten minutes that
links every page, no project history outside CHANGELOG.md and docs/experiments/, a spec reference
generated from the models, every reliability id a test names defined, every link alive."""

from __future__ import annotations

import os
import re

import pytest

from tests.conftest import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
# "issue 12", "issues 10 and 11", "#27"-style references to this project's issues, and commit hashes
# (7 to 40 hex digits with at least one letter and one digit).
HISTORY = re.compile(
    r"(?i)\bissues?\s*#?\d+|(?<![\w/#-])#\d{1,4}\b|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"
)


def _links(text: str) -> list[str]:
    """The targets of a page's markdown links (code spans, which may hold brackets, left out)."""
    return [m.group(1) for m in LINK.finditer(re.sub(r"`[^`\n]*`", "", text))]


def _pages() -> list:
    return sorted(DOCS.rglob("*.md"))


def _current() -> list:
    """The README and every doc that says what nmm is now (history lives elsewhere)."""
    return [README, *(p for p in _pages() if "experiments" not in p.relative_to(DOCS).parts)]


def test_the_readme_is_a_front_door_of_at_most_300_lines_linking_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    linked = {(README.parent / target).resolve() for target in _links(text)}
    index = DOCS / "experiments" / "README.md"
    linked |= {(index.parent / target).resolve() for target in _links(index.read_text())}
    assert [str(p.relative_to(ROOT)) for p in _pages() if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", _current(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_number_or_commit_hash_outside_the_changelog_and_experiments(page):
    found = [(i, m.group(0)) for i, line in enumerate(page.read_text().splitlines(), 1) for m in HISTORY.finditer(line)]
    assert found == [], f"{page.name}: project history belongs in CHANGELOG.md or docs/experiments/"


def test_the_history_pattern_catches_what_it_must_and_spares_digests():
    for bad in ("since issue 13", "Issues 10 and 11", "a fresh clone of 8c08fda", "see #27"):
        assert HISTORY.search(bad), bad
    for fine in ("sha256 digests", "argo-workflows#6150", "2026-12-07", "0.958", "`PORT` 8080", "deadbeef"):
        assert not HISTORY.search(fine), fine


@pytest.mark.parametrize("page", [README, ROOT / "CHANGELOG.md", *_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file(page):
    dead = [t for t in _links(page.read_text()) if "://" not in t and not (page.parent / t).exists()]
    assert dead == []


def test_the_spec_reference_is_generated_from_the_models():
    from nmm.spec.reference import markdown

    page = DOCS / "pipelines.md"
    if os.environ.get("NMM_UPDATE_GOLDEN"):
        page.write_text(markdown())
    assert page.read_text() == markdown(), "docs/pipelines.md drifted from nmm.spec; run `make docs`"


def test_every_reliability_id_a_test_names_is_defined():
    named = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        for name in re.findall(r"def (test_\w+)", path.read_text()):
            named |= {m.upper() for m in re.findall(r"_([rs]\d+)(?=_|$)", name)}
    defined = set(re.findall(r"^### ([RS]\d+)$", (DOCS / "reliability.md").read_text(), flags=re.M))
    assert named and named <= defined, sorted(named - defined)


def test_the_readme_s_command_table_names_every_command():
    from typer.main import get_command

    from nmm.cli import app

    commands = set(get_command(app).commands)
    table = set(re.findall(r"^\| `nmm (\w+)", README.read_text(), flags=re.M))
    assert commands == table, commands ^ table


def test_every_test_the_docs_name_exists():
    """`tests/…py::test_name` in a page names a test that is there (a renamed test fails here)."""
    missing = []
    for page in [README, *_pages()]:
        for path, name in re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", page.read_text()):
            file = ROOT / path
            if not file.exists() or (name and f"def {name}(" not in file.read_text()):
                missing.append(f"{page.name}: {path}::{name}")
    assert missing == []
