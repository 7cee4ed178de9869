"""The structure of issue 12: one loss (pretrain.loss) and one forward for every layout, the regression tests of the
three bugs the copies had drifted into, the exact gradient norm in every ZeRO stage, the one-way package graph,
and pretrain.preflight (one validation entry point, also run by the launch scripts)."""
import ast
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import REPO, run_distributed, run_train, train
from pretrain.config import load_config
from pretrain.loss import BALANCE_TERMS, LOSS_NAMES, LossWeights, balance_experts, total_loss
from pretrain.model import ModelOutput, build_model
from pretrain.model.transformer import mtp_labels, positions_in_documents


# ------------------------------------------------------------------------------------------ one loss

def test_total_loss_is_the_hand_computed_formula():
    cfg = load_config("tiny", ["moe.seq_aux_alpha=0.01", "moe.aux_loss_alpha=0.1"])
    out = ModelOutput(lm_loss=torch.tensor(2.0), mtp_losses=[torch.tensor(1.0), torch.tensor(3.0)],
                      moe_terms={"seq_aux": torch.tensor(0.5), "expert_aux": torch.tensor(0.25)})
    loss, parts = total_loss(out, LossWeights.at(cfg, 0.3))
    assert loss.item() == pytest.approx(2.0 + 0.3 * 2.0 + 0.01 * 0.5 + 0.1 * 0.25)
    assert list(parts) == list(LOSS_NAMES)
    assert parts["mtp_loss"].item() == 2.0 and parts["seq_aux_loss"].item() == 0.5
    # a pipeline's last stage adds the terms the earlier stages carried forward
    carried = torch.tensor([1.0, 2.0] + [0.0] * (len(BALANCE_TERMS) - 2))
    loss2, parts2 = total_loss(out, LossWeights.at(cfg, 0.3), carried)
    assert loss2.item() == pytest.approx(loss.item() + 0.01 * 1.0 + 0.1 * 2.0)
    assert parts2["expert_aux_loss"].item() == 2.25


def test_fully_masked_micro_batch_is_zero_not_nan():
    """Every label ignored: the fused head, the logits path (a replaced loss_fn) and MTP give 0, gradients 0."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ids = torch.randint(0, 512, (2, 16))
    labels = torch.full_like(ids, -100)
    for replace_loss in (False, True):
        m = copy.deepcopy(model)
        if replace_loss:  # the logits path (what tensor parallelism's vocab-parallel loss takes)
            from pretrain.model.transformer import cross_entropy_loss
            m.loss_fn = lambda logits, lab: cross_entropy_loss(logits, lab)
        out = m(ids, labels=labels)
        assert out.lm_loss.item() == 0.0 and all(x.item() == 0.0 for x in out.mtp_losses)
        total_loss(out, LossWeights.at(cfg, 0.3))[0].backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def _tp2_fully_masked(rank, world):
    from parallel import Topology, initialize_parallel, parallelize_model
    cfg = load_config("tiny", ["parallel.tp=2", "train.global_batch_size=2"])
    initialize_parallel(Topology.from_config(cfg, world, rank=rank))
    torch.manual_seed(0)
    model = parallelize_model(build_model(cfg.model), Topology.from_config(cfg, world, rank=rank), cfg)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=torch.full_like(ids, -100))
    loss, _ = total_loss(out, LossWeights.at(cfg, 0.3))
    assert torch.isfinite(loss) and out.lm_loss.item() == 0.0, (rank, out.lm_loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    dist.barrier()


def test_tp2_fully_masked_micro_batch_is_finite():
    """Regression: the vocab-parallel cross-entropy divided by the raw label count (0 / 0 = NaN)."""
    run_distributed(_tp2_fully_masked, 2)


def test_mtp_targets_never_cross_a_document_end():
    labels = torch.arange(10, 18).unsqueeze(0)  # (1, 8)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    assert mtp_labels(labels, 1).tolist() == [[11, 12, 13, 14, 15, 16, 17, -100]]
    # depth 1 at position i sees token i+1 and predicts labels[i+1]: valid while i+1 is in i's document
    assert mtp_labels(labels, 1, docs).tolist() == [[11, 12, -100, 14, 15, 16, -100, -100]]
    assert mtp_labels(labels, 2, docs).tolist() == [[12, -100, -100, 15, 16, -100, -100, -100]]
    assert positions_in_documents(docs).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


def test_bias_moves_only_after_an_applied_step():
    cfg = load_config("tiny")
    model = build_model(cfg.model)
    load = torch.arange(2 * 8, dtype=torch.float32).view(2, 8)
    bias = lambda: [r.e_score_correction_bias.clone() for r in model.modules() if hasattr(r, "e_score_correction_bias")]  # noqa: E731,E501
    before = bias()
    balance_experts(model, load, 0.001, applied=False)
    assert all(torch.equal(a, b) for a, b in zip(before, bias()))
    balance_experts(model, load, 0.001, applied=True)
    after = bias()
    assert torch.equal(after[0] - before[0], 0.001 * torch.sign(load[0].mean() - load[0]))


# ------------------------------------------------------------------------ pipeline regressions (pp2)

def _bias(step_dir) -> dict:
    from parallel.shards import gather_pipeline_state_dict
    model = build_model(load_config("tiny").model)
    state = gather_pipeline_state_dict(step_dir, model)
    return {k: v for k, v in state.items() if k.endswith("e_score_correction_bias")}


@pytest.mark.slow
def test_pp2_evaluation_every_step_changes_neither_bias_nor_losses(data_dir, tmp_path):
    """Regression: pipeline stages counted expert load during eval_batch too, and it reached the next bias update."""
    plain = train(tmp_path / "plain", data_dir, 2, "parallel.pp=2")
    evald = train(tmp_path / "eval", data_dir, 2, "parallel.pp=2", "train.eval_interval=1",
                  f"data.eval_paths=[{data_dir}]", "train.eval_iters=2")
    assert all("eval_loss" in r for r in evald)
    for a, b in zip(plain, evald):
        assert (a["loss"], a["lm_loss"], a["mtp_loss"]) == (b["loss"], b["lm_loss"], b["mtp_loss"]), (a, b)
    final = "step_0000003"
    want, got = _bias(tmp_path / "plain" / final), _bias(tmp_path / "eval" / final)
    assert want.keys() == got.keys() and want
    for k in want:
        assert torch.equal(want[k], got[k]), k


@pytest.mark.slow
def test_pp2_skipped_step_leaves_the_bias(data_dir, tmp_path, monkeypatch):
    """Regression: the pipeline moved the bias on a step the StepGuard skipped (weights stayed, bias moved)."""
    out = tmp_path / "run"
    # NaN in a routed expert's gradient on rank 1 (the last stage holds the MoE layer and MTP) at step 2
    run_train(out, data_dir, "parallel.pp=2", "train.keep_last=4", nproc=2, fault="nan_expert_grad:2:1",
              monkeypatch=monkeypatch)
    from helpers import losses
    assert [r["skipped"] for r in losses(out)] == [False, True, False, False]
    b1, b2, b3 = (_bias(out / f"step_000000{s}") for s in (1, 2, 3))
    for k in b1:
        assert torch.equal(b1[k], b2[k]), f"{k} moved on the skipped step 2"
    assert any(not torch.equal(b2[k], b3[k]) for k in b1), "the bias must move again on step 3"


# -------------------------------------------------------------------- gradient norm in every ZeRO stage

@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [
    (2, ["parallel.tp=2", "parallel.zero_stage=0"]),
    (2, ["parallel.ep=2", "parallel.zero_stage=0"]),
    (2, ["parallel.ep=2", "parallel.zero_stage=2"]),
    (2, ["parallel.pp=2", "parallel.zero_stage=0"]),
    (2, ["parallel.tp=2", "parallel.zero_stage=2"]),
], ids=["zero0-tp2", "zero0-dp2-ep2", "zero2-dp2-ep2", "zero0-pp2", "zero2-tp2"])
def test_grad_norm_and_losses_are_the_single_process_ones(reference, data_dir, tmp_path, nproc, layout):
    """train/grad_norm is the single process's in every layout and ZeRO stage (clipping is active, so the
    losses of steps 2-3 also depend on it): ZeRO 0 used to count TP-replicated parameters tp times and average
    the per-rank norms over data-parallel ranks (each holding other experts). zero2-tp2 (4 micro-batches): the
    TP-split experts' gradients reduce-scattered per micro-batch into a shard and gathered at the boundary."""
    got = train(tmp_path / "run", data_dir, nproc, *layout)
    assert reference[1]["grad_norm"] > 1.0
    for want, have in zip(reference, got):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert abs(have[key] - want[key]) <= 1e-4 * abs(want[key]), (layout, want["step"], key, want, have)


# ------------------------------------------------------------------------------- one-way package graph

LOOP_MODULES = {"pretrain.engine", "pretrain.checkpoint", "pretrain.train", "pretrain.export"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (top level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _package(name: str) -> list[Path]:
    return sorted((Path(REPO) / name).rglob("*.py"))


def test_package_graph_is_one_way():
    """pretrain.config / pretrain.model <- parallel <- engine, checkpoint, train, export."""
    for path in _package("parallel"):
        bad = {m for m in _imports(path) if any(m == x or m.startswith(x + ".") for x in LOOP_MODULES)}
        assert not bad, f"{path.relative_to(REPO)} imports the loop module(s) {sorted(bad)}"
    for path in _package("pretrain/model"):
        bad = {m for m in _imports(path) if m.startswith(("torch.distributed", "parallel", "deepspeed"))
               or any(m == x or m.startswith(x + ".") for x in LOOP_MODULES)}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: the model is plain PyTorch"
    config = _imports(Path(REPO) / "pretrain" / "config.py")
    assert not {m for m in config if m.startswith(("parallel", "pretrain.", "deepspeed", "torch"))}
    shards = _imports(Path(REPO) / "parallel" / "shards.py")
    assert not {m for m in shards if m.startswith("deepspeed")}, "shard consolidation must be DeepSpeed-free"


def test_exporting_a_single_process_checkpoint_imports_no_deepspeed(checkpoint_reference, tmp_path):
    code = ("import sys; sys.modules['deepspeed'] = None\n"  # any import of deepspeed now raises ImportError
            "from pretrain.checkpoint import load_model_from_checkpoint\n"
            f"model, cfg, _ = load_model_from_checkpoint({str(checkpoint_reference)!r})\n"
            "print(sum(p.numel() for p in model.parameters()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) > 0


# ------------------------------------------------------------------------------------------- preflight

def _preflight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.preflight", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_preflight_ok_and_resolves_the_vocabulary(tmp_path):
    from helpers import write_token_dir
    from pretrain.preflight import preflight
    data = write_token_dir(str(tmp_path / "d"), [torch.arange(50).numpy()] * 4, vocab_size=1000, eos_id=3)
    manifest = Path(data) / "manifest.json"
    import json
    m = json.loads(manifest.read_text())
    m["tokenizer"]["vocab_size"] = 1000
    manifest.write_text(json.dumps(m))
    cfg = load_config("tiny", [f"data.paths=[{data}]", "model.vocab_size=null", "parallel.tp=2",
                               "train.global_batch_size=4"])
    checked = preflight(cfg, 4, rank=0)
    assert cfg.model.vocab_size == 1024 and checked.eos_id == 3 and checked.topo.dp == 2  # 1000 -> 4 x 256
    cfg = load_config("tiny", [f"data.paths=[{data}]", "model.vocab_size=null"])
    preflight(cfg, 1, rank=0)
    assert cfg.model.vocab_size == 1024  # 8 x 128
    with pytest.raises(Exception, match=r"model.vocab_size=512 is smaller than the vocabulary .* \(1000\)"):
        preflight(load_config("tiny", [f"data.paths=[{data}]"]), 1, rank=0)
    r = _preflight("--config", "tiny", "--world-size", "2", f"data.paths=[{data}]", "model.vocab_size=null")
    assert r.returncode == 0 and r.stdout.startswith("preflight ok: tiny on tp=1 pp=1 ep=1 dp=2 world=2"), r.stderr


@pytest.mark.parametrize("args, message", [
    (["--world-size", "3", "parallel.tp=2"], "parallel layout tp=2 pp=1 ep=1 dp=? world=3"),
    (["--world-size", "2", "parallel.tp=2", "model.num_attention_heads=3"], "num_attention_heads"),
    (["--world-size", "2", "data.paths=[/nonexistent/shards]"], "data.paths: /nonexistent/shards"),
    (["--world-size", "2", "data.reset_attention_at_eos=true"], "record no eos id"),
    (["--world-size", "2", "parallel.ep=2", "parallel.zero_stage=0", "train.precision=bf16"],
     "use parallel.zero_stage=1"),
])
def test_preflight_errors_are_one_line(data_dir, args, message, capsys):
    from pretrain.preflight import main
    if not any(a.startswith("data.paths") for a in args):
        args = [*args, f"data.paths=[{data_dir}]"]
    assert main(["--config", "tiny", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_launch_script_refuses_a_bad_config_in_one_line(data_dir, tmp_path, launcher):
    """pretrain.sh runs the preflight once before the launcher: one line, no ChildFailedError traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(LAUNCHER=launcher, NPROC_PER_NODE="2", CONFIG="tiny")
    r = subprocess.run(["bash", "launch_scripts/pretrain.sh", "parallel.tp=4", f"data.paths=[{data_dir}]",
                        f"train.output_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=300)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.splitlines() == [err] and err.startswith("error: parallel layout tp=4"), err
    assert "ChildFailedError" not in r.stdout + r.stderr and not (tmp_path / "config.yaml").exists()


@pytest.mark.slow
def test_pp2_balance_losses_of_an_early_stage_train_its_routers(data_dir, tmp_path):
    """A MoE layer on stage 0 with large balance weights: its terms travel forward detached (for the logged loss)
    and get their gradient in backward (pipeline._AuxLossGrad); losses and gradient norms equal one process."""
    big = ["model.first_k_dense_replace=0", "moe.seq_aux_alpha=0.5", "moe.aux_loss_alpha=0.3"]
    want = train(tmp_path / "one", data_dir, 1, *big)
    got = train(tmp_path / "pp2", data_dir, 2, *big, "parallel.pp=2", "parallel.pipeline_layout=[1,1]")
    assert want[0]["seq_aux_loss"] > 0.1
    for a, b in zip(want, got):
        for key in ("loss", "lm_loss", "seq_aux_loss", "expert_aux_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (key, a, b)
