"""Every pointer to a document in code, tests, benchmarks and the README resolves in this repo:
``docs/<file>.md §N[.M]`` names a file under docs/ that has a section N (a heading ``## N.`` or
``### N.M``), and nothing points at documents kept outside the repository (issue 16)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
FILES = [*ROOT.glob("effsft/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py"),
         ROOT / "README.md"]
REF = re.compile(r"(docs/[\w/.-]+\.md)(?: §(\d+)(?:\.(\d+))?)?")
OUTSIDE = re.compile(r"spec §|DESIGN\.md|\.\./shared|specs/\w+\.md")


def _sections(doc: pathlib.Path) -> set[str]:
    out = set()
    for line in doc.read_text().splitlines():
        m = re.match(r"#{2,4}\s+(\d+)(?:\.(\d+))?[.\s]", line) or re.match(r"\*\*(\d+)\.(\d+)\b", line)
        if m:
            out.add(m.group(1))
            if m.group(2):
                out.add(f"{m.group(1)}.{m.group(2)}")
    return out


def test_doc_references_resolve():
    bad, seen = [], 0
    for f in FILES:
        if f.name == pathlib.Path(__file__).name:
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            where = f"{f.relative_to(ROOT)}:{n}"
            for m in REF.finditer(line):
                seen += 1
                doc = ROOT / m.group(1)
                if not doc.exists():
                    bad.append(f"{where}: {m.group(1)} does not exist")
                elif m.group(2) and m.group(2) not in _sections(doc):
                    bad.append(f"{where}: {m.group(1)} has no section {m.group(2)}")
            if OUTSIDE.search(line):
                bad.append(f"{where}: points outside the repo: {line.strip()[:100]}")
    assert seen > 10, "the pattern no longer finds the references"
    assert not bad, "\n".join(bad)
