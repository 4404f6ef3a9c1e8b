"""No sentence of the authors' repository in the project (it has no licence): no 6-word sequence of the phrases
REFERENCE.md quotes from their code occurs in a tracked text file, and the project's own wording shares none
with the neutral stand-in either (the stand-in mirrors the authors' layout).

The phrases themselves are not copied here: the scan reads `shared/REFERENCE.md` when a checkout has it beside
(or above) it, and otherwise uses SHA-256 hashes of their normalised 6-word sequences
(`fixtures/no-authors-text/quoted_shingles.sha256`; regenerate with `python tests/test_no_authors_text.py`)."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vilavt.benchmarks import INSTRUCTIONS
from vilavt.remote_code.prompts_vilavt import DEFAULT_PROMPTS, SLOTS

ROOT = Path(__file__).resolve().parent.parent
HASHES = Path(__file__).parent / "fixtures" / "no-authors-text" / "quoted_shingles.sha256"
STANDIN = Path(__file__).parent / "fixtures" / "authors-behaviour" / "prompts" / "standin"
EXCLUDED = ("tests/fixtures/authors-behaviour/",)  # the stand-in and the authors' code's outputs, by design
BINARY = (".safetensors", ".gz", ".png", ".jpg", ".pt", ".bin")
WIDTH = 6


def words(text: str) -> list[str]:
    """Lower-case words; punctuation, escapes (`\\n` in JSON or source) and braces are separators."""
    return re.findall(r"[a-z0-9]+", re.sub(r"\\[nrt\"']", " ", text).lower())


def shingles(text: str) -> set[str]:
    w = words(text)
    return {" ".join(w[i : i + WIDTH]) for i in range(len(w) - WIDTH + 1)}


def digest(shingle: str) -> str:
    return hashlib.sha256(shingle.encode("utf-8")).hexdigest()


def reference_md() -> Path | None:
    """`shared/REFERENCE.md` beside the checkout or above it (a worktree sits one level deeper)."""
    for folder in ROOT.parents:
        candidate = folder / "shared" / "REFERENCE.md"
        if candidate.is_file():
            return candidate
    return None


def quoted_phrases(reference: str) -> list[str]:
    """The double-quoted spans of REFERENCE.md, cut at its ellipses and " / " line marks (a 6-word sequence
    across them is not the authors'); the paper's title, quoted after its arXiv number, is not their code's."""
    reference = re.sub(r'arXiv \d+\.\d+ \("[^"]*"\)', "", reference)
    return [part for span in re.findall(r'"([^"]*)"', reference) for part in re.split(r"…| / ", span)]


def reference_hashes(reference: str) -> set[str]:
    return {digest(s) for phrase in quoted_phrases(reference) for s in shingles(phrase)}


def stored_hashes() -> set[str]:
    return {line.strip() for line in HASHES.read_text(encoding="ascii").splitlines() if line.strip()}


def forbidden_hashes() -> set[str]:
    found = reference_md()
    return stored_hashes() | (reference_hashes(found.read_text(encoding="utf-8")) if found else set())


def tracked_text_files() -> dict[str, str]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the project's own folders
        names = [str(p.relative_to(ROOT)) for d in ("src", "tests", "examples", "bench") for p in (ROOT / d).rglob("*")]
        names += [p.name for p in ROOT.glob("*.py")] + [p.name for p in ROOT.glob("*.md")]
    files = {}
    for name in names:
        path = ROOT / name
        if name.startswith(EXCLUDED) or name.endswith(BINARY) or not path.is_file() or "__pycache__" in name:
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        files[name] = data.decode("utf-8", errors="replace")
    return files


def project_wording() -> dict[str, str]:
    texts = {f"{style}.{slot}": getattr(prompts, slot) for style, prompts in DEFAULT_PROMPTS.items() for slot in SLOTS}
    texts.update({f"instruction for {kind}": text for kind, text in INSTRUCTIONS.items()})
    return texts


def test_no_tracked_file_holds_a_6_word_sequence_the_reference_quotes_from_the_authors():
    forbidden = forbidden_hashes()
    assert len(forbidden) > 50  # the scan has something to look for
    hits = {
        name: sorted(s for s in shingles(text) if digest(s) in forbidden)
        for name, text in tracked_text_files().items()
    }
    hits = {name: found for name, found in hits.items() if found}
    assert not hits, f"6-word sequences of the authors' quoted phrases: {hits}"


def prose(text: str) -> str:
    """`text` without the protocol both wordings must share: tags and brace groups (the tool-call schema,
    placeholders)."""
    text = re.sub(r"<[^<>]*>", " ", text)
    while re.search(r"\{[^{}]*\}", text):
        text = re.sub(r"\{[^{}]*\}", " ", text)
    return text


def test_the_project_wording_shares_no_6_word_sequence_with_the_standin():
    standin = set().union(*(shingles(prose(p.read_text(encoding="utf-8"))) for p in STANDIN.rglob("*.py")))
    assert len(standin) > 200
    shared = {name: sorted(shingles(prose(text)) & standin) for name, text in project_wording().items()}
    assert not {name: s for name, s in shared.items() if s}, shared


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The normalisation catches a quoted phrase however it is punctuated, cased, escaped or split over lines;
    checked with a stand-in sentence (REFERENCE.md's phrases only enter as hashes)."""
    sentence = "Keep to the layout shown above without any deviation."
    hashes = {digest(s) for s in shingles(sentence)}
    for variant in ('"keep TO the layout,\\nshown above -- without any"', "# Keep to the\n#   layout shown above"):
        assert {digest(s) for s in shingles(variant)} & hashes, variant
    assert not {digest(s) for s in shingles("Keep to the layout shown beside it")} & hashes


def test_the_stored_hashes_cover_the_reference():
    """The offline list is what REFERENCE.md quotes today (a new quote there needs the list regenerated)."""
    found = reference_md()
    if found is None:
        pytest.skip("shared/REFERENCE.md is not beside this checkout; the stored hashes stand in for it")
    missing = reference_hashes(found.read_text(encoding="utf-8")) - stored_hashes()
    assert not missing, f"{len(missing)} new shingles: run `python tests/test_no_authors_text.py`"


if __name__ == "__main__":  # regenerate the stored hashes from REFERENCE.md
    found = reference_md()
    if found is None:
        sys.exit("shared/REFERENCE.md not found beside or above this checkout")
    HASHES.parent.mkdir(parents=True, exist_ok=True)
    HASHES.write_text("".join(h + "\n" for h in sorted(reference_hashes(found.read_text(encoding="utf-8")))))
    print(f"{HASHES}: {len(stored_hashes())} hashes from {found}")
