"""Documentation that must not drift from the code: the generated config reference, the cluster commands."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import SECTIONS, load_config
from pretrain.config_reference import field_docs, render, undocumented_fields

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


# ------------------------------------------------------------------ launch_scripts/README.md: cluster commands

LAUNCH_README = ROOT / "launch_scripts" / "README.md"


def bash_commands(markdown: str) -> list[str]:
    """Command lines of the ```bash blocks (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def scripts_read_by(script: Path) -> str:
    """The text of the script and of what it runs or sources (env.sh, and the multinode script for sbatch)."""
    parts = [script, ROOT / "launch_scripts" / "env.sh"]
    if script.suffix == ".sbatch":
        parts.append(ROOT / "launch_scripts" / "pretrain_multinode.sh")
    return "\n".join(p.read_text() for p in parts)


@pytest.mark.parametrize("doc", ["launch_scripts/README.md", "README.md"])
def test_launch_commands_use_real_scripts_variables_and_config_keys(doc):
    commands = [c for c in bash_commands((ROOT / doc).read_text()) if "launch_scripts/" in c]
    if doc == "launch_scripts/README.md":
        assert len(commands) >= 8
    for line in commands:
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=.*", w))
        script = next(w for w in words if w.startswith("launch_scripts/"))
        path = ROOT / script
        assert path.is_file(), f"{line}: {script} does not exist"
        text = scripts_read_by(path)
        for name in env:
            assert name in text, f"{line}: {script} never reads {name}"
        overrides = [w for w in words[words.index(script) + 1:] if "=" in w]
        load_config(env.get("CONFIG", "tiny"), overrides)  # unknown keys or bad values raise ConfigError
        if "HOSTFILE" in env:
            assert (ROOT / env["HOSTFILE"]).is_file()


def test_documented_knobs_are_passed_through():
    env_sh = (ROOT / "launch_scripts" / "env.sh").read_text()
    passthrough = re.search(r'PASSTHROUGH_VARS="(.*?)"', env_sh, flags=re.S).group(1).split()
    section = LAUNCH_README.read_text().split("## Communication knobs")[1].split("##")[0]
    knobs = set(re.findall(r"`([A-Z][A-Z_]+)(?:=[^`]*)?`", section)) - {"MASTER_PORT", "DS_ENV_FILE"}
    assert knobs and knobs <= set(passthrough), knobs - set(passthrough)


def test_troubleshooting_quotes_the_real_layout_errors():
    from parallel import Topology

    table = LAUNCH_README.read_text().split("## Troubleshooting")[1]
    for overrides, quoted_prefix in ((["parallel.tp=4"], "parallel layout tp=4 pp=1 ep=1 dp=? world=2: "),
                                     (["parallel.ep=4"], "ep=4 does not divide dp=2; set parallel.ep")):
        with pytest.raises(ValueError) as err:
            Topology.from_config(load_config("tiny", overrides), 2, 0)
        assert quoted_prefix in str(err.value)
        assert quoted_prefix.split(":")[0] in table
    assert "tp=4 x pp=1 x dp=? != world 2" in table
