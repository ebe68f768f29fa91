"""Every test docs/OPERATIONS.md names exists (file and function)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_named_test_exists():
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| fault")
            and not ln.startswith("|---")]
    assert len(rows) >= 15
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row)
        assert refs, f"a row without a test: {row[:80]}"
        for path, name in refs:
            src = (ROOT / path).read_text()
            assert re.search(rf"^(async )?def {name}\(", src, re.M), f"{path}::{name} does not exist"
