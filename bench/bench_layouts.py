"""Each parallel layout on 2 processes through the real loop: step time and peak RSS per rank vs pretrain.info.

    python bench/bench_layouts.py [--preset small-moe] [--steps 6] [--layouts dp2 "dp2 ep2" tp2 pp2]

Every layout runs ``python -m torch.distributed.run --nproc_per_node 2 -m pretrain.train`` (gloo, one thread per
rank, fp32, the preset's batch) on shards built once from a few stdlib files (cached under /tmp). The trainers
run inside this file's ``--train-worker`` wrapper, which records the resident set after importing torch,
DeepSpeed and the project (the "framework" baseline) and the process's peak resident set at exit (one JSON file per rank). Step time:
median of the per-step ``tokens/s`` the loop prints (log_interval 1), first step excluded. The estimate is
``pretrain.info.memory_per_rank`` (weights, gradients, AdamW state, activations: no interpreter or libraries),
so it is compared with peak minus baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

CACHE = Path(tempfile.gettempdir()) / "deepseek_pretrain_bench" / "layouts"
LAYOUTS = {"dp2": [], "dp2 ep2": ["parallel.ep=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}
SOURCES = ("argparse.py", "dataclasses.py", "shutil.py", "textwrap.py", "typing.py", "inspect.py")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def train_worker(argv: list[str]) -> int:
    """Run pretrain.train in this process and print one JSON line with this rank's memory at exit."""
    import atexit

    import deepspeed  # noqa: F401  (part of the baseline: every trainer imports it)
    import pretrain.train as train

    baseline = _rss_kib("VmRSS")

    def report() -> None:  # one file per rank: lines printed by two ranks interleave
        rank = int(os.environ.get("RANK", 0))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        Path(os.environ["BENCH_RSS_DIR"], f"rank{rank}.json").write_text(
            json.dumps({"rank": rank, "baseline": baseline * 1024, "peak": peak * 1024}))
    atexit.register(report)
    return train.main(argv)


def shards() -> Path:
    """Tokenizer (vocab 2048) and shards from a few stdlib files, built once."""
    out = CACHE / "shards"
    if (out / "manifest.json").exists() or any(out.glob("*.idx")):
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / f) for f in SOURCES]
    subprocess.run([sys.executable, "-m", "data_pipeline.tokenizer", "--input", *files, "--vocab-size", "2048",
                    "--output", str(CACHE / "tok.model")], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "data_pipeline.build", "--input", *files, "--tokenizer",
                    str(CACHE / "tok.model"), "--output", str(out), "--workers", "1", "--overwrite", "--no-progress"],
                   check=True, capture_output=True)
    return out


def run_layout(preset: str, name: str, steps: int, data: Path) -> dict:
    """One 2-process run; returns step time, tokens per step and per-rank memory."""
    run_dir = CACHE / "runs" / name.replace(" ", "_")
    args = ["--config", preset, f"data.paths=[{data}]", f"train.output_dir={run_dir}", f"train.steps={steps}",
            "train.log_interval=1", "train.save_interval=100000", "train.heatmap_interval=100000",
            "train.precision=fp32", *LAYOUTS[name]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--train-worker", *args]
    rss_dir = CACHE / "rss" / name.replace(" ", "_")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "BENCH_RSS_DIR": str(rss_dir)}
    subprocess.run(["rm", "-rf", str(run_dir), str(rss_dir)], check=True)
    rss_dir.mkdir(parents=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"layout {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rates = [float(m.replace(",", "")) for m in re.findall(r"tokens/s ([\d,]+)", proc.stdout)]
    ranks = sorted((json.loads(f.read_text()) for f in rss_dir.glob("rank*.json")), key=lambda r: r["rank"])
    if len(rates) < 2 or len(ranks) != 2:
        raise RuntimeError(f"layout {name}: no step rates or memory lines in the output:\n{proc.stdout[-2000:]}")
    return {"layout": name, "tokens_per_s": statistics.median(rates[1:]), "ranks": ranks}


def estimate(preset: str, name: str) -> int:
    """pretrain.info's bytes per rank (max over stages) for the layout on 2 processes, fp32."""
    from pretrain.config import load_config
    from pretrain.info import model_info

    cfg = load_config(preset, ["train.precision=fp32", *LAYOUTS[name]])
    p = cfg.parallel
    return model_info(cfg, tp=p.tp, pp=p.pp, ep=p.ep, dp=2 // (p.tp * p.pp))["memory_per_rank_bytes"]


def bench(preset: str = "small-moe", steps: int = 6, layouts=tuple(LAYOUTS)) -> list[dict]:
    data = shards()
    rows = []
    for name in layouts:
        row = run_layout(preset, name, steps, data)
        row["estimate"] = estimate(preset, name)
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    mib = 2 ** 20
    lines = ["| layout | tokens/s | vs dp2 | rank | framework RSS MiB | peak RSS MiB | peak - framework MiB | "
             "pretrain.info estimate MiB |", "|" + "---|" * 8]
    base = rows[0]["tokens_per_s"]
    for row in rows:
        for r in row["ranks"]:
            lines.append(f"| {row['layout']} | {row['tokens_per_s']:.0f} | {row['tokens_per_s'] / base:.2f}x | "
                         f"{r['rank']} | {r['baseline'] / mib:.0f} | {r['peak'] / mib:.0f} | "
                         f"{(r['peak'] - r['baseline']) / mib:.0f} | {row['estimate'] / mib:.0f} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--train-worker":
        return train_worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-moe")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    print(format_rows(bench(args.preset, args.steps, args.layouts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
