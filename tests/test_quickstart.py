"""The README's first command: its quickstart script runs end to end on a real corpus and prints generated text.

The full job (the preset's steps) takes minutes; here it runs with a few steps, which exercises every stage
(tokenizer, shards, 2-process training, export, generation in transformers). Set QUICKSTART_FULL=1 to run it
with the preset's length and also require the loss to fall below the corpus's unigram entropy.
"""
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_first_command() -> str:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")][0]


def test_readme_first_command_is_install_then_quickstart():
    cmd = readme_first_command()
    assert cmd.startswith('python3 -m pip install "torch==2.13.0"')
    assert cmd.endswith("bash launch_scripts/quickstart.sh")


def test_readme_second_command_is_ci_test_command():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[1] == "python3 -m pytest tests"
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    full = os.environ.get("QUICKSTART_FULL") == "1"
    env = dict(os.environ, WORK=str(tmp_path / "qs"))
    if not full:
        env["STEPS"] = "6"
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    # The same script the README's first command ends with (the pip install before it is CI's own first step).
    proc = subprocess.run(["bash", "launch_scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800 if full else 900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "unigram entropy:" in out
    windows = re.search(r"^lm_loss \(main model, nats/token\), mean per window: (.*)$", out, flags=re.M)
    assert windows and (full or windows.group(1).count(":") == 6), out[-3000:]
    # two prompts, each echoed and followed by the generated continuation (whitespace for a 6-step model)
    samples = re.findall(r"--- prompt .*? ->\n(.*?)(?=--- prompt|=== \[)", out, flags=re.S)
    assert len(samples) == 2 and samples[0].startswith("import os") and samples[1].startswith("class Path:")
    hf = tmp_path / "qs" / "hf"
    assert (hf / "config.json").is_file() and "deepseek_v3" in (hf / "config.json").read_text()
    if full:
        assert "below, the model uses context" in out, out[-3000:]
