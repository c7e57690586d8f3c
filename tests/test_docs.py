"""docs/ALGORITHMS.md is the algorithm reference the code cites (the file name, then a section name in
double quotes): every cited section must be one of its headings."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ALGORITHMS.md"
CITE = re.compile(r'docs/ALGORITHMS\.md,?\s*\(?"([^"]+)"')


def cited_sections():
    out = {}
    for folder in ("engine", "kernels", "export", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in CITE.findall(path.read_text()):
                out.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return out


def test_every_cited_section_is_a_heading():
    headings = [line.lstrip("#").strip() for line in DOC.read_text().splitlines() if line.startswith("#")]
    cited = cited_sections()
    assert cited, "no code cites docs/ALGORITHMS.md any more: is the citation pattern still right?"
    missing = {name: files for name, files in cited.items()
               if not any(re.match(rf"{re.escape(name)}\b", h) for h in headings)}
    assert not missing, f"sections cited but not headings of {DOC.name}: {missing}"
