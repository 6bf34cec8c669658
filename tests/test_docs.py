"""The markdown docs render: every table row has as many cells as its header; the CPU launch lines are right."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")


def cells(line: str) -> list[str]:
    """Cells of a GitHub-flavoured-markdown table row.

    GFM splits a row at every ``|`` not escaped as ``\\|``, also inside a code span (`` `a|b` `` is two cells; write
    `` `a\\|b` ``), after dropping one leading and one trailing pipe.
    """
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", s)]


def tables(text: str) -> list[tuple[int, list[tuple[int, str]]]]:
    """(line number of the header, [(line number, row)] with the header and delimiter first) of every table
    outside fenced code blocks."""
    lines = text.splitlines()
    out, fenced, i = [], False, 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            fenced = not fenced
        elif (not fenced and "|" in lines[i] and i + 1 < len(lines) and "-" in lines[i + 1]
              and DELIMITER.match(lines[i + 1].strip())):
            rows = [(i + 1, lines[i]), (i + 2, lines[i + 1])]
            j = i + 2
            while j < len(lines) and lines[j].strip() and "|" in lines[j]:
                rows.append((j + 1, lines[j]))
                j += 1
            out.append((i + 1, rows))
            i = j
            continue
        i += 1
    return out


def test_cell_splitting():
    assert cells("| a | `b` | c |") == ["a", "`b`", "c"]
    assert cells(r"| a | `x \| y` |") == ["a", r"`x \| y`"]  # escaped: one cell
    assert len(cells("| a | `x | y` |")) == 3  # GFM splits inside code spans too
    assert cells("a | b") == ["a", "b"]
    found = tables("text\n\n| a | b |\n|---|---|---|\n| 1 | 2 |\n\n```\n| x |\n|---|\n```\n")
    assert [(n, len(rows)) for n, rows in found] == [(3, 3)]  # the fenced one is no table


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_has_the_header_cell_count(doc):
    text = doc.read_text(encoding="utf-8")
    bad = []
    for header_line, rows in tables(text):
        want = len(cells(rows[0][1]))
        bad += [f"{doc.name}:{n}: {len(cells(row))} cells, header (line {header_line}) has {want}: {row[:80]}"
                for n, row in rows[1:] if len(cells(row)) != want]
    assert not bad, "\n".join(bad)


def test_every_doc_has_tables_where_expected():
    """The parser sees the tables at all (guards against a parser that finds none and so checks none)."""
    n = {doc.name: len(tables(doc.read_text(encoding="utf-8"))) for doc in DOCS}
    assert n["README.md"] >= 4 and n["variants.md"] >= 1 and sum(n.values()) >= 30, n


def _section(text: str, title: str) -> str:
    start = text.index(title)
    nxt = text.find("\n## ", start + len(title))
    return text[start:] if nxt < 0 else text[start:nxt]


def _code_lines(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            lines.append(line)
    return lines


@pytest.mark.parametrize("where", ["docs/distributed.md"])
def test_accelerate_launch_lines_work_on_cpu(where):
    """Without a config file `accelerate launch` starts several processes only with `--multi_gpu` (or when it
    sees more than one GPU); a bare `--num_processes 2`, or `--cpu --num_processes 2`, runs the script once on a
    CPU machine. And the script must build `Accelerator(cpu=True)` there, else each process trains alone.
    tests/distributed/test_accelerate.py runs the `--multi_gpu` form on CPU."""
    path, _, title = where.partition("#")
    text = (ROOT / path).read_text(encoding="utf-8")
    if title:
        text = _section(text, f"## {title}")
    launches = [line for line in _code_lines(text) if "accelerate launch" in line]
    assert launches, f"no accelerate launch line in {where}"
    assert all("--multi_gpu" in line for line in launches), launches
    assert any("CPU" in line for line in launches), launches  # the CPU form is shown as such
    assert "Accelerator(cpu=" in text  # and the script side of it
    assert "--cpu --num_processes 2" in text  # the form that looks right and runs one process, named as such


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_figure_exists(doc):
    """Markdown links and images to files of the checkout (not URLs) point at files that exist."""
    missing = [target for target in LINK.findall(doc.read_text())
               if "://" not in target and not target.startswith("mailto:")
               and not (doc.parent / target).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"
