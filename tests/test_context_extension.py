"""Context extension (issue 13): a small MLA model trained at sequence 128, evaluated at 512 zero-shot: YaRN's held-out
loss is not worse than plain RoPE's (bench/bench_context_extension.py, the run in bench/results.md)."""
import json
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def test_yarn_zero_shot_at_4x_is_not_worse_than_plain_rope(tmp_path):
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "bench/bench_context_extension.py", "--steps", "200", "--ext-steps", "0",
                        "--out", str(tmp_path / "work"), "--json", str(out), "--no-write"],
                       cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    plain, yarn = res["zero-shot, plain RoPE"], res["zero-shot, YaRN s=4"]
    assert yarn["512"] <= plain["512"], res
