"""posttrain.rejection_sample: K samples per prompt -> rewards -> SFT jsonl. On a tiny model SFT'd for a few dozen
steps on the ``add`` task (it learns to answer with digits and end its turn): the output is posttrain.sft input,
best-of-K keeps the top-scoring sample, threshold keeps every distinct one at or above it, duplicates are written
once, the run is reproducible with --seed, and a bad --rewards spec is one line before any model is loaded."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from helpers import run_checked, torchrun, trained_tokenizer, write_jsonl


def digits(prompt, completion, sample) -> float:
    """A test reward with many distinct values: the number of digits in the completion."""
    return float(sum(c.isdigit() for c in completion))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny-preset model SFT'd from scratch for 40 steps on 200 ``add`` items, and 12 RL prompts."""
    from posttrain.arithmetic import write
    out = tmp_path_factory.mktemp("rs")
    shutil.copy(trained_tokenizer(500), out / "tok.model")
    files = write(out / "data", 200, 12, seed=3)
    run_checked([sys.executable, "-m", "posttrain.sft", "--config", "tiny", f"data.paths=[{files['sft']}]",
                 f"train.output_dir={out / 'sft'}", f"data.tokenizer={out / 'tok.model'}", "train.steps=40",
                 "train.global_batch_size=16", "train.micro_batch_size=16", "data.seq_length=32", "optim.lr=3e-3",
                 "schedule.warmup_steps=2", "model.num_nextn_predict_layers=0", "train.save_interval=1000"])
    return {"run": out / "sft", "prompts": Path(files["heldout"])}


def sample(sft_run, out, *extra, prompts=None) -> tuple[int, list[dict]]:
    from posttrain.rejection_sample import main
    rc = main(["--checkpoint", str(sft_run["run"]), "--prompts", str(prompts or sft_run["prompts"]), "--output",
               str(out), "--max-new-tokens", "6", *extra])
    return rc, [json.loads(line) for line in out.read_text().splitlines()] if rc == 0 else []


def by_prompt(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault(row["messages"][0]["content"], []).append(row["messages"][-1]["content"])
    return out


def test_reason_task_is_checked_by_the_rule_rewards():
    """posttrain.arithmetic --task reason: R1's format, held out from training, the accuracy reward on "answer"."""
    from posttrain.arithmetic import is_correct, make
    from posttrain.rl.rewards import accuracy, format_reward
    data = make(300, 50, seed=1, task="reason")
    assert data["sft"][0]["messages"][1]["content"] == (
        f"<think>{' '.join(data['rl'][0]['answer'])}</think><answer>{data['rl'][0]['answer']}</answer>")
    assert len(data["rl"]) == 300 and not {r["prompt"] for r in data["rl"]} & {h["prompt"] for h in data["heldout"]}
    for record, conversation in zip(data["rl"], data["sft"]):
        response = conversation["messages"][1]["content"]
        assert accuracy(record["prompt"], response, record) == 1.0 == format_reward(record["prompt"], response, {})
    for item in data["heldout"]:
        assert accuracy(item["prompt"], item["rejected"], item) == 0.0 == is_correct(item["prompt"], item["rejected"])
        assert is_correct(item["prompt"], f"<think>x</think><answer>{item['answer']}</answer>")


def test_select_best_threshold_ties_and_truncation():
    from posttrain.rejection_sample import select
    texts = ["a", "b", "a", "c", "d"]
    complete = [True, True, True, True, False]
    assert select([0.5, 1.0, 0.5, 1.0, 9.0], complete, texts, "best", None) == ([1], None)  # tie: the first; 9 is cut
    assert select([0.5, 0.2, 0.7, 0.1, 9.0], complete, texts, "best", None) == ([2], None)
    assert select([0.5, 0.2, 0.7, 0.1, 9.0], complete, texts, "best", 0.8) == ([], "below_threshold")
    assert select([0.5, 0.2, 0.7, 0.6, 9.0], complete, texts, "threshold", 0.5) == ([0, 3], None)  # "a" once
    assert select([1.0] * 5, [False] * 5, texts, "threshold", 0.0) == ([], "all_truncated")
    # pairs: (first best, first worst) among the complete samples, only when they differ
    assert select([0.5, 1.0, 0.2, 1.0, -9.0], complete, texts, "pairs", None) == ([1, 2], None)
    assert select([0.5, 0.5, 0.5, 0.5, 9.0], complete, texts, "pairs", None) == ([], "no_contrast")


def test_pairs_are_preference_input_and_arithmetic_reward_is_the_rule(sft_run, tmp_path, capsys):
    """--keep pairs writes {prompt, chosen, rejected} lines posttrain.data.load_pairs reads, chosen scoring above
    rejected; posttrain.arithmetic:reward is is_correct as a reward function."""
    from posttrain.arithmetic import reward
    from posttrain.chat import ChatTokenizer
    from posttrain.data import load_pairs
    assert reward("repeat 1234", " 1234 ", {"prompt": "repeat 1234"}) == 1.0
    assert reward("repeat 1234", "1244", {"prompt": "repeat 1234"}) == 0.0
    rc, _ = sample(sft_run, tmp_path / "pairs.jsonl", "--rewards", "test_rejection_sample:digits", "--samples", "4",
                   "--keep", "pairs")
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert lines and all(digits(None, x["chosen"], None) > digits(None, x["rejected"], None) for x in lines)
    skipped: dict = {}
    pairs = load_pairs([str(tmp_path / "pairs.jsonl")], ChatTokenizer(sft_run["run"] / "tokenizer.model"), 64, skipped)
    assert len(pairs) == len(lines) and skipped == {}


def test_reward_specs_parse_like_rl_rewards():
    from posttrain.rejection_sample import parse_reward_specs
    assert parse_reward_specs(None) == [{"fn": "accuracy"}]
    assert parse_reward_specs(["accuracy=2", "format", "{fn: 'm:f', weight: 0.5, name: x}"]) == [
        {"fn": "accuracy", "weight": 2.0}, {"fn": "format"}, {"fn": "m:f", "weight": 0.5, "name": "x"}]


def test_output_is_sft_input_best_is_the_max_and_seed_reproduces(sft_run, tmp_path, capsys):
    from posttrain.chat import ChatTokenizer
    from posttrain.data import load_sft
    from posttrain.rl.rewards import accuracy
    spec = ["--rewards", "test_rejection_sample:digits", "accuracy=0.5", "--samples", "4", "--seed", "3"]
    rc, every = sample(sft_run, tmp_path / "all.jsonl", *spec, "--keep", "threshold", "--threshold", "-1")
    assert rc == 0, capsys.readouterr().err
    rc, best = sample(sft_run, tmp_path / "best.jsonl", *spec)
    assert rc == 0
    summary = capsys.readouterr().out.splitlines()
    assert summary[-2].startswith("rejection_sample: 12 prompts, 48 samples, kept ") and "mean reward" in summary[-2]
    assert summary[-1].startswith("dropped prompts: all_truncated=")

    def reward(prompt, completion):
        answer = str(sum(int(x) for x in prompt.rstrip("=").split("+")))
        return digits(None, completion, None) + 0.5 * accuracy(prompt, completion, {"answer": answer})

    every, best = by_prompt(every), by_prompt(best)
    assert best and set(best) <= set(every)
    assert sum(len(v) for v in every.values()) > len(every)  # the samples differ: best-of-K had a choice
    for prompt, kept in best.items():
        scores = [reward(prompt, c) for c in every[prompt]]  # distinct completions in sample order
        assert len(kept) == 1 and kept[0] == every[prompt][scores.index(max(scores))]
        assert len(set(every[prompt])) == len(every[prompt])  # dedup within a prompt
    skipped: dict = {}
    rows = load_sft([str(tmp_path / "all.jsonl")], ChatTokenizer(sft_run["run"] / "tokenizer.model"), 64,
                    "assistant", skipped)
    assert len(rows) == sum(len(v) for v in every.values()) and skipped == {}
    rc, again = sample(sft_run, tmp_path / "again.jsonl", *spec)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "best.jsonl").read_text()
    rc, other = sample(sft_run, tmp_path / "other.jsonl", *spec[:-1], "4", "--keep", "threshold", "--threshold", "-1")
    assert (tmp_path / "other.jsonl").read_text() != (tmp_path / "all.jsonl").read_text()


def test_threshold_dedup_and_drop_reasons(sft_run, tmp_path, capsys):
    items = [json.loads(line) for line in sft_run["prompts"].read_text().splitlines()][:4]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), items + items[:2] + [{"no_prompt": 1}])
    # Nearly greedy: the 4 samples of a prompt are one completion, a repeated prompt adds nothing.
    rc, rows = sample(sft_run, tmp_path / "near.jsonl", "--samples", "4", "--temperature", "1e-4", "--keep",
                      "threshold", "--threshold", "-1", "--rewards", "test_rejection_sample:digits", prompts=prompts)
    assert rc == 0 and len(rows) == 4 and len({json.dumps(r) for r in rows}) == 4
    assert "kept 4," in capsys.readouterr().out
    rc, rows = sample(sft_run, tmp_path / "none.jsonl", "--keep", "threshold", "--threshold", "100",
                      "--rewards", "test_rejection_sample:digits", prompts=prompts)
    out = capsys.readouterr().out
    assert rc == 0 and rows == [] and "dropped prompts: all_truncated=0, below_threshold=6, no_contrast=0, missing_key=1" in out
    rc, rows = sample(sft_run, tmp_path / "cut.jsonl", "--max-new-tokens", "1", prompts=prompts)
    assert rc == 0 and rows == [] and "all_truncated=6, below_threshold=0" in capsys.readouterr().out


@pytest.mark.parametrize("spec, message", [
    ("nosuch.module:fn", "rl.rewards[0].fn 'nosuch.module:fn': cannot import module 'nosuch.module'"),
    ("accuracy=heavy", "rl.rewards[0].weight must be a finite number, got 'heavy'"),
    ("{fn: accuracy, wieght: 2}", "rl.rewards[0] has unknown key(s) ['wieght']"),
])
def test_bad_rewards_spec_is_one_line(tmp_path, capsys, spec, message):
    from posttrain.rejection_sample import main
    rc = main(["--checkpoint", str(tmp_path / "missing"), "--prompts", str(tmp_path / "p.jsonl"), "--output",
               str(tmp_path / "o.jsonl"), "--rewards", spec])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_keep_threshold_needs_threshold(tmp_path, capsys):
    from posttrain.rejection_sample import main
    rc = main(["--checkpoint", "x", "--prompts", "p", "--output", str(tmp_path / "o"), "--keep", "threshold"])
    assert rc == 2 and "--keep threshold needs --threshold X" in capsys.readouterr().err


@pytest.mark.slow
def test_two_data_parallel_ranks_give_the_one_process_output(sft_run, tmp_path):
    """Under torchrun the prompts are split over the ranks and gathered on rank 0: nearly greedy sampling gives
    the single process's file."""
    common = ["--checkpoint", str(sft_run["run"]), "--prompts", str(sft_run["prompts"]), "--samples", "2",
              "--temperature", "1e-4", "--max-new-tokens", "6", "--keep", "threshold", "--threshold", "-1",
              "--rewards", "format"]
    run_checked([sys.executable, "-m", "posttrain.rejection_sample", *common, "--output", str(tmp_path / "one")])
    run_checked(["-m", "posttrain.rejection_sample", *common, "--output", str(tmp_path / "two")],
                launcher=torchrun(2))
    assert (tmp_path / "two").read_text() == (tmp_path / "one").read_text() != ""


def exact(prompt, completion, sample) -> float:
    """A test reward: the whole completion is the answer (the ``add`` task's exact match)."""
    return float(completion.strip() == sample["answer"])


def test_evaluate_runs_scores_greedy_completions_and_reads_reward_curves(sft_run, tmp_path, capsys):
    from posttrain.chat import ChatTokenizer
    from posttrain.evaluate import exact_match, load_policy, main
    rl = tmp_path / "rl"
    rl.mkdir()
    write_jsonl(str(rl / "metrics.jsonl"), [{"step": 1, "rl/reward_mean": 0.25}, {"step": 2, "loss": 1.0},
                                            {"step": 3, "rl/reward_mean": 0.5}])
    out = tmp_path / "res.json"
    assert main(["--heldout", str(sft_run["prompts"]), "--runs", f"a={sft_run['run']}", f"b={sft_run['run']}",
                 "--rewards", "test_rejection_sample:exact", "test_rejection_sample:digits=0.5",
                 "--max-new-tokens", "6", "--curves", f"rl={rl}", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    model, tokenizer = load_policy(sft_run["run"])
    items = [json.loads(line) for line in sft_run["prompts"].read_text().splitlines()]
    expected = exact_match(model, ChatTokenizer(tokenizer), items)  # the SFT example's own exact match
    assert res["items"] == 12 and res["heldout"]["a"] == res["heldout"]["b"]
    assert res["heldout"]["a"]["exact"] == pytest.approx(expected)
    assert res["heldout"]["a"]["reward_mean"] == pytest.approx(expected + 0.5 * res["heldout"]["a"]["digits"])
    assert res["reward_curve"] == {"rl": [[1, 0.25], [3, 0.5]]}
    capsys.readouterr()
    assert main(["--heldout", str(sft_run["prompts"]), "--runs", "a", "--json", str(out)]) == 2
    assert "--runs 'a': each run is NAME=RUN_DIR" in capsys.readouterr().err
    assert main(["--heldout", str(sft_run["prompts"]), "--runs", f"a={sft_run['run']}", "--rewards",
                 "test_rejection_sample:exact", "--curves", f"x={sft_run['run']}"]) == 2
    assert "has no 'rl/reward_mean' (not an RL run?)" in capsys.readouterr().err


@pytest.mark.slow
def test_r1_quickstart_runs_every_stage(tmp_path):
    """launch_scripts/r1_quickstart.sh shrunk by its environment variables: every stage runs and results.json has
    the held-out scores after each stage and both reward curves."""
    import os
    import subprocess
    env = dict(os.environ, WORK=str(tmp_path / "r1"), BASE_STEPS="6", COLD="32", SFT_EPOCHS="1", GRPO_STEPS="2",
               GROUP="2", PROMPTS="4", RS_PROMPTS="8", RS_SAMPLES="2", HELDOUT="16", OMP_NUM_THREADS="1",
               PYTHON=sys.executable)
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["bash", str(repo / "launch_scripts/r1_quickstart.sh")], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "r1/results.json").read_text())
    assert res["items"] == 16 and list(res["heldout"]) == ["sft", "grpo1", "rs_sft", "grpo2"]
    assert all(set(s) == {"reward_mean", "accuracy", "format_reward"} for s in res["heldout"].values())
    assert {name: [step for step, _ in curve] for name, curve in res["reward_curve"].items()} == {
        "grpo1": [1, 2], "grpo2": [1, 2]}
    assert "rejection_sample: 8 prompts, 16 samples" in proc.stdout and "held-out (16 items, greedy):" in proc.stdout
    assert "grpo2 rl/reward_mean by step: " in proc.stdout
