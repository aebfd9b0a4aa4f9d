"""docs/config.md is generated from the config dataclasses; it must be current and complete."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = "run `python scripts/gen_config_docs.py`"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_doc_is_current():
    text, _ = _generator().config_markdown()
    doc = ROOT / "docs" / "config.md"
    assert doc.exists(), f"{doc} is missing: {FIX}"
    assert doc.read_text() == text, f"docs/config.md is stale (config dataclasses changed): {FIX}"


def test_every_config_key_has_a_comment():
    _, missing = _generator().config_markdown()
    assert not missing, (
        f"config keys without a comment: {', '.join(missing)}. Add a `# ...` comment beside (or just "
        f"above) each field, then {FIX}"
    )
