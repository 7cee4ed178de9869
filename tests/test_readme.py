"""Documentation that must not drift from the code: the generated config reference."""
import subprocess
import sys
from pathlib import Path

from pretrain.config_reference import field_docs, render, undocumented_fields
from pretrain.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_up_to_date():
    # If this fails after changing pretrain/config.py: python -m pretrain.config_reference > docs/CONFIG.md
    out = subprocess.run([sys.executable, "-m", "pretrain.config_reference"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert out == render()
    assert (ROOT / "docs" / "CONFIG.md").read_text() == out, \
        "docs/CONFIG.md is stale: run python -m pretrain.config_reference > docs/CONFIG.md"


def test_every_config_key_is_documented_with_its_default():
    assert undocumented_fields() == []
    text = render()
    for name, cls in SECTIONS.items():
        for key in field_docs(cls):
            assert f"| `{name}.{key}` |" in text
    # one row checked cell by cell: type, default and docstring come through
    assert "| `optim.betas` | `list` | `[0.9, 0.95]` | Adam betas. |" in text
    assert "| `model.q_lora_rank` | `int \\| None` | `null` | MLA query compression rank" in text
