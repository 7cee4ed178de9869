"""posttrain.sft / rm / dpo end to end on the pretraining loop: train.init_from, the layouts (dp2, tp2, dp2-ep2; SFT
also pp2) give the single-process losses, exact resume, the held-out eval/loss, RM and DPO under pp2. Each
run is a few seconds of the tiny preset. The data (``chat_data``), the single-process runs (``single``) and the
launcher (``helpers.posttrain``) are shared with tests/test_posttrain_layouts4.py (the four-process layouts)."""
from __future__ import annotations

import sys

import pytest
import torch

from helpers import POSTTRAIN_METRICS as METRICS, POSTTRAIN_STEPS as STEPS, assert_same_losses, losses, posttrain


@pytest.fixture(scope="module")
def old_run(reference, tmp_path_factory):
    """The shared 3-step pretraining run (conftest ``reference``): its run directory."""
    return next(tmp_path_factory.getbasetemp().glob("ref*/run/latest")).parent


@pytest.mark.slow
def test_init_from_continues_where_the_run_ended(old_run, data_dir, tmp_path):
    """A new phase from a run's weights: its first step's lm_loss is the old weights' loss on that batch."""
    from data_pipeline.dataset import SampleStream, build_dataset
    from helpers import train
    from pretrain.checkpoint import load_model_from_checkpoint
    from pretrain.config import load_config
    from pretrain.schedule import total_samples

    first = train(tmp_path / "phase2", data_dir, 1, f"train.init_from={old_run}", "train.steps=2")[0]
    model, _, _ = load_model_from_checkpoint(old_run)
    cfg = load_config("tiny", [f"data.paths=[{data_dir}]", "train.steps=2"])
    stream = SampleStream(build_dataset(cfg.data.paths, None, cfg.data.seq_length, cfg.train.seed,
                                        total_samples(cfg)), 0, 1, cfg.train.micro_batch_size)
    with torch.no_grad():
        expected = [float(model(t[:, :-1], labels=t[:, 1:]).lm_loss) for t in stream.next_batch(8)]
    assert first["lm_loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_init_from_refuses_another_architecture(old_run):
    from pretrain.checkpoint import load_init_weights
    from pretrain.config import ConfigError, load_config
    from pretrain.model import build_model

    cfg = load_config("tiny", [f"train.init_from={old_run}", "model.moe_intermediate_size=16"])
    with pytest.raises(ConfigError, match=r"^model.moe_intermediate_size=16 but train.init_from=.* was trained "
                                          r"with 32"):
        load_init_weights(build_model(cfg.model), cfg)


@pytest.mark.slow
def test_stages_learn_on_one_process(single):
    assert single["sft"][-1]["lm_loss"] < single["sft"][0]["lm_loss"]
    first = single["dpo"][0]  # policy = reference at step 1: log 2 plus alpha x the balance term
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-3)
    assert single["dpo"][-1]["rewards/chosen"] != 0.0  # the policy moved away from the reference
    assert {"rm/accuracy", "rm/margin"} <= set(single["rm"][0])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.tp=2"], ["parallel.ep=2"]],
                         ids=["dp2", "tp2", "dp2-ep2"])
@pytest.mark.parametrize("stage", list(METRICS))
def test_layouts_give_the_single_process_losses(stage, layout, single, chat_data, tmp_path):
    records = losses(posttrain(stage, tmp_path / "run", chat_data, *layout, nproc=2) and tmp_path / "run")
    assert_same_losses(records, single[stage], METRICS[stage])


@pytest.mark.slow
@pytest.mark.parametrize("stage,extra", [("sft", ()), ("rm", ()), ("dpo", ()),
                                         ("dpo", ("dpo.precompute_reference=true",))],
                         ids=["sft", "rm", "dpo", "dpo-precomputed"])
def test_resume_is_exact(stage, extra, single, chat_data, tmp_path):
    out = tmp_path / "run"
    posttrain(stage, out, chat_data, "train.exit_at_step=1", *extra)
    posttrain(stage, out, chat_data, *extra)
    assert_same_losses(losses(out), single[stage], METRICS[stage], rel=1e-6)


def _heldout_chat(chat_data) -> str:
    """The held-out items as SFT conversations (``data.eval_paths`` takes the stage's own format)."""
    import json
    from pathlib import Path

    path = Path(chat_data["heldout"]).with_name("heldout_chat.jsonl")
    rows = [json.loads(line) for line in Path(chat_data["heldout"]).read_text().splitlines()]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["answer"]}]}) + "\n"
                            for r in rows))
    return str(path)


EVAL = ("train.eval_interval=1", "train.eval_iters=2")


@pytest.fixture(scope="module")
def sft_eval(chat_data, tmp_path_factory):
    """A single-process SFT run with the held-out loss every step: its run directory."""
    out = tmp_path_factory.mktemp("sft_eval") / "run"
    posttrain("sft", out, chat_data, f"data.eval_paths=[{_heldout_chat(chat_data)}]", *EVAL)
    return out


@pytest.mark.slow
def test_sft_eval_loss_is_the_masked_heldout_loss(sft_eval, chat_data):
    """``eval/loss`` at the last step = the saved weights' masked lm_loss on the held-out rows, recomputed here."""
    import numpy as np

    from posttrain.chat import ChatTokenizer
    from posttrain.data import SFTDataset, load_sft
    from pretrain.checkpoint import load_model_from_checkpoint

    records = losses(sft_eval)
    assert all("eval_loss" in r for r in records)
    model, cfg, tokenizer = load_model_from_checkpoint(sft_eval)
    tok = ChatTokenizer(tokenizer)
    samples = load_sft([_heldout_chat(chat_data)], tok, cfg.data.seq_length, cfg.train.loss_on, {})
    mb = cfg.train.micro_batch_size
    ds = SFTDataset(samples, cfg.data.seq_length, cfg.train.seed, tok.pad_id, 2 * mb)
    rows = torch.from_numpy(np.stack([ds[i] for i in range(2 * mb)]))
    model.eval()
    with torch.no_grad():
        expected = [float(model(r[:, 0], labels=r[:, 1], document_ids=r[:, 2]).lm_loss) for r in rows.split(mb)]
    assert (rows[:, 1] == -100).any() and (rows[:, 1] != -100).any()  # prompts masked, answers trained
    assert records[-1]["eval_loss"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]


@pytest.mark.slow
def test_sft_pipeline_gives_the_single_process_losses(sft_eval, chat_data, tmp_path):
    """SFT under pp2 (two stages, 1F1B, masked labels and document ids sent along) = one process, eval included."""
    out = tmp_path / "run"
    posttrain("sft", out, chat_data, f"data.eval_paths=[{_heldout_chat(chat_data)}]", *EVAL, "parallel.pp=2",
              nproc=2)
    assert_same_losses(losses(out), losses(sft_eval), METRICS["sft"] + ("eval_loss",))


@pytest.mark.slow
def test_rm_eval_loss_is_the_heldout_bradley_terry_loss(chat_data, tmp_path):
    """RM ``eval/loss`` = the mean -log sigmoid(r_chosen - r_rejected) of the held-out pairs, scored by the saved
    reward model (``RewardModel.score``); 4 pairs = the 2 micro-batches of 2 one evaluation reads."""
    import json

    import torch.nn.functional as F

    from posttrain.reward import RewardModel

    pairs = tmp_path / "heldout_prefs.jsonl"
    pairs.write_text("".join(open(chat_data["prefs"]).readlines()[-4:]))
    out = tmp_path / "run"
    posttrain("rm", out, chat_data, f"data.eval_paths=[{pairs}]", *EVAL)
    rm = RewardModel.load(out)
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    chosen = rm.score([[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
                       for r in records])
    rejected = rm.score([[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]
                         for r in records])
    expected = float(-F.logsigmoid(torch.tensor(chosen) - torch.tensor(rejected)).mean())
    assert losses(out)[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_dpo_eval_loss_with_a_precomputed_reference_equals_the_held_one(chat_data, tmp_path):
    """DPO ``eval/loss`` on held-out pairs: the reference precomputed before the first update (a table of its own
    for the held-out pairs) gives the held reference model's numbers."""
    pairs = tmp_path / "heldout_prefs.jsonl"
    pairs.write_text("".join(open(chat_data["prefs"]).readlines()[-4:]))
    runs = {}
    for name, extra in (("held", ()), ("precomputed", ("dpo.precompute_reference=true",))):
        posttrain("dpo", tmp_path / name, chat_data, f"data.eval_paths=[{pairs}]", *EVAL, *extra)
        runs[name] = losses(tmp_path / name)
    assert (tmp_path / "precomputed" / "eval_reference_logps.pt").is_file()
    assert_same_losses(runs["precomputed"], runs["held"], METRICS["dpo"] + ("eval_loss",), rel=1e-5)
    assert runs["held"][0]["eval_loss"] != pytest.approx(0.6931471805599453, abs=1e-4)  # the policy moved


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_pipeline_gives_the_single_process_losses(stage, single, chat_data, tmp_path):
    """pp2: the last stage computes the pair loss from DeepSpeed's labels tuple (lengths; DPO's reference log-probs,
    the frozen reference cut to the same stages and run through the pipeline before the step)."""
    records = losses(posttrain(stage, tmp_path / "run", chat_data, "parallel.pp=2", nproc=2) and tmp_path / "run")
    assert_same_losses(records, single[stage], METRICS[stage])


def test_an_objective_without_output_loss_is_refused_under_pipeline():
    """Under pp the last stage calls ``output_loss``: an objective overriding only ``loss`` gets one line."""
    from pretrain.config import ConfigError, load_config
    from pretrain.train import Objective, check_pipeline_support
    from posttrain.objectives import DPOObjective

    class OnlyLoss(Objective):
        def loss(self, model, batch, weights):
            raise AssertionError("not called")

    check_pipeline_support(load_config("tiny", ["parallel.pp=1"]), OnlyLoss())
    check_pipeline_support(load_config("tiny", ["parallel.pp=2"]), DPOObjective())
    with pytest.raises(ConfigError, match=r"^parallel.pp=2: OnlyLoss overrides loss\(\) but not output_loss\(\)"):
        check_pipeline_support(load_config("tiny", ["parallel.pp=2"]), OnlyLoss())


@pytest.mark.slow
def test_launch_script_runs_a_posttrain_module(single, chat_data, tmp_path):
    """``MODULE=posttrain.sft launch_scripts/pretrain.sh ...``: the same run as ``python -m posttrain.sft``."""
    import os
    import subprocess

    from helpers import free_port, launch_env
    out = tmp_path / "run"
    env = dict(launch_env(), MODULE="posttrain.sft", LAUNCHER="torchrun", NPROC_PER_NODE="1",
               MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    args = [f"data.paths=[{chat_data['sft']}]", f"train.output_dir={out}", f"data.tokenizer={chat_data['tokenizer']}",
            f"train.steps={STEPS}", "train.log_interval=1", "train.global_batch_size=4"]
    proc = subprocess.run(["bash", "launch_scripts/pretrain.sh", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-m posttrain.sft --config tiny" in proc.stderr
    assert_same_losses(losses(out), single["sft"], METRICS["sft"], rel=1e-6)
