"""Checkpoints of a run directory: save, automatic resume, and loading the weights back for export.

Layout of ``train.output_dir``::

    config.yaml                 resolved config of the run
    tokenizer.model             copy of the sentencepiece model the data was built with (when known)
    latest                      name of the newest *complete* checkpoint (written last, atomically, by rank 0)
    step_0000100/
        mp_rank_00_model_states.pt, zero_pp_rank_R_mp_rank_00_optim_states.pt   DeepSpeed engine state
        trainer_state.json      step, samples consumed, tokens seen, schedule state, loss window, data fingerprint
        rng_rank_00000.pt ...   RNG states (python, numpy, torch, cuda) of every rank (tensors and lists only)
        config.yaml             resolved config (the architecture check and export read it)
        checksums.json          sha256 of every other file of the directory; written last: marks it complete

A checkpoint counts only once it has ``checksums.json`` and ``latest`` names it: both are written after every rank
has finished writing (an all-gather that also collects write errors such as ENOSPC from every rank), ``latest``
through a temporary file renamed over the old one, so a crash mid-save leaves the previous checkpoint as the resume
point, and a save that failed on any rank fails on every rank with one message. Resume verifies the checksums
(each rank hashes a share of the files) and, on a corrupt checkpoint or a bad ``latest``, stops naming the file or,
with ``train.checkpoint_fallback``, takes the newest older checkpoint that verifies. Directories without
``checksums.json`` (a crashed save) are never resumed from and are deleted at the next successful save.
The ``latest`` format (the tag on one line) is DeepSpeed's own, so ``zero_to_fp32`` reads our run directories.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain import faults
from pretrain.config import Config, ConfigError, load_config, save_config

STATE_FILE = "trainer_state.json"
CHECKSUMS = "checksums.json"
_TAG = re.compile(r"^step_\d{7}$")


class CheckpointError(ValueError):
    """A checkpoint could not be written or read; the message names the file and the way out."""


@dataclass
class TrainState:
    """Where the run is: everything besides the engine needed to continue exactly."""

    step: int = 0
    """Optimizer steps completed."""
    consumed_samples: int = 0
    """Global samples consumed (the data position)."""
    tokens_seen: int = 0
    """Training tokens consumed (drives the LR, lambda and gamma schedules)."""
    skipped_steps: int = 0
    """Optimizer steps skipped so far (non-finite values, loss spikes)."""
    loss_window: list = field(default_factory=list)
    """Losses of the last train.loss_spike_window applied steps (the loss-spike detector's memory)."""
    data_fingerprint: list = field(default_factory=list)
    """[[shard name, .bin bytes, .idx sha256], ...] of the training data: a changed shard is refused on resume."""


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj) -> list:
    """Every rank's ``obj`` (pickled by torch.distributed between our own ranks only)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run_files(cfg: Config, run_dir: Path, tokenizer: str | None) -> str | None:
    """Rank 0: the resolved config and a copy of the tokenizer in the run directory; returns the copy's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if tokenizer is None:
        return None
    target = run_dir / "tokenizer.model"
    if Path(tokenizer).resolve() != target.resolve():
        shutil.copyfile(tokenizer, target)
    return str(target)


def _rng_state() -> dict:
    """Tensors, lists and numbers only, so that loading needs no unpickling of arbitrary objects."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- checksums

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: Path) -> None:
    """Collective: each rank hashes a share of the files rank 0 lists; rank 0 writes ``checksums.json``."""
    names = _broadcast(_files(step_dir) if _rank() == 0 else None)
    mine = {n: _sha256(step_dir / n) for n in names[_rank()::_world()]}
    merged = {k: v for part in _all_gather(mine) for k, v in part.items()}
    if _rank() == 0:
        _atomic_write(step_dir / CHECKSUMS, json.dumps({"sha256": dict(sorted(merged.items()))}, indent=1))


def verify_checksums(step_dir: Path, collective: bool = True) -> list[str]:
    """Problems of ``step_dir`` against its ``checksums.json`` (empty = intact), one line each naming the file.

    ``collective``: every rank calls it and hashes a share; all get the same answer."""
    path = step_dir / CHECKSUMS
    try:
        want = json.loads(path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path}: unreadable or missing ({type(e).__name__}): the save did not complete"]
    rank, world = (_rank(), _world()) if collective else (0, 1)
    problems = []
    for name in sorted(want)[rank::world]:
        file = step_dir / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif _sha256(file) != want[name]:
            problems.append(f"{file}: sha256 differs from {CHECKSUMS} ({file.stat().st_size} bytes; truncated or "
                            f"corrupted)")
    return sorted(p for part in (_all_gather(problems) if collective else [problems]) for p in part)


# ------------------------------------------------------------------------------------------------- save

def _save_files(engine, cfg: Config, state: TrainState, schedule_state: dict, step_dir: Path) -> None:
    """This rank's part of a checkpoint (DeepSpeed's engine files, RNG; rank 0: state and config)."""
    engine.save_checkpoint(str(step_dir.parent), tag=step_dir.name, save_latest=False)
    if faults.active("crash_in_save", state.step, _rank()):
        os.kill(os.getpid(), signal.SIGKILL)
    rng_file = step_dir / f"rng_rank_{_rank():05d}.pt"
    if faults.active("enospc_in_save", state.step, _rank()):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(rng_file))
    torch.save(_rng_state(), rng_file)
    from parallel.shards import needs_model_shards, save_model_shards
    if needs_model_shards(cfg):  # ZeRO's merge cannot rebuild TP/EP shards: export reads these instead
        save_model_shards(engine.module, cfg, step_dir)
    if _rank() == 0:
        save_config(cfg, step_dir / "config.yaml")
        extra = {"schedule": schedule_state, "dp_size": getattr(engine, "dp_world_size", 1)}
        (step_dir / STATE_FILE).write_text(json.dumps({**asdict(state), **extra}, indent=1))


def save_checkpoint(engine, cfg: Config, state: TrainState, schedule_state: dict) -> Path:
    """Collective: every rank writes its engine shard and RNG state; then checksums, then rank 0 publishes
    ``latest``. A write error on any rank (disk full, ...) raises CheckpointError on every rank, naming the ranks;
    ``latest`` keeps naming the previous checkpoint."""
    run_dir = Path(cfg.train.output_dir)
    step_dir = run_dir / tag_for(state.step)
    if _rank() == 0 and step_dir.is_dir() and read_latest(run_dir) != step_dir.name:
        shutil.rmtree(step_dir)  # left behind by a save that crashed: start it afresh
    _barrier()
    error = None
    try:
        # save_latest=False: DeepSpeed would write `latest` before the other ranks are known to be done.
        _save_files(engine, cfg, state, schedule_state, step_dir)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    errors = {r: e for r, e in enumerate(_all_gather(error)) if e}  # also the barrier: every rank has written
    if errors:
        detail = "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))
        raise CheckpointError(f"saving checkpoint {step_dir} failed on rank(s) {sorted(errors)} ({detail}); "
                              f"`latest` still names {read_latest(run_dir)}, the resume point; free space and "
                              f"restart")
    write_checksums(step_dir)
    _barrier()
    if _rank() == 0:
        _atomic_write(run_dir / "latest", step_dir.name)
        prune_checkpoints(run_dir, cfg.train.keep_last)
    _barrier()
    return step_dir


def complete_tags(run_dir: Path) -> list[str]:
    """Step directories with a ``checksums.json`` (the save finished), newest first."""
    return sorted((p.name for p in Path(run_dir).glob("step_*") if _TAG.match(p.name) and (p / CHECKSUMS).is_file()),
                  reverse=True)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete step directories (never the one ``latest`` names), and
    every incomplete one (a save that crashed)."""
    latest = read_latest(run_dir)
    keep = set(complete_tags(run_dir)[:keep_last]) | {latest}
    for old in Path(run_dir).glob("step_*"):
        if old.is_dir() and old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def read_latest(run_dir: Path) -> str | None:
    """The tag named by ``run_dir/latest`` if that checkpoint exists, else None."""
    latest = Path(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag and (Path(run_dir) / tag / STATE_FILE).is_file() else None


# ----------------------------------------------------------------------------------------------- resume

def _latest_problem(run_dir: Path) -> tuple[str | None, str | None]:
    """(tag named by ``latest``, None) or (None, what is wrong with it); (None, None) when there is no ``latest``
    and no complete checkpoint (a fresh run)."""
    latest = run_dir / "latest"
    if not latest.is_file():
        return None, (f"{latest} is missing but complete checkpoints exist" if complete_tags(run_dir) else None)
    text = latest.read_text(errors="replace").strip()
    if not text:
        return None, f"{latest} is empty"
    if not _TAG.match(text):
        return None, f"{latest} holds {text[:40]!r}, not a step_NNNNNNN tag"
    if not (run_dir / text / CHECKSUMS).is_file():
        return None, f"{latest} names {text}, but {run_dir / text} does not exist or is incomplete"
    return text, None


def select_checkpoint(cfg: Config) -> str | None:
    """Collective: the tag to resume from (verified against its checksums), or None for a fresh run.

    A bad ``latest`` or a corrupt checkpoint raises CheckpointError naming the file, or with
    ``train.checkpoint_fallback`` yields the newest older checkpoint that verifies."""
    run_dir = Path(cfg.train.output_dir)
    tag, problem = _latest_problem(run_dir)
    if tag is None and problem is None:
        return None
    if tag is not None:
        bad = verify_checksums(run_dir / tag)
        if not bad:
            return tag
        problem = f"checkpoint {run_dir / tag} is corrupt: {bad[0]}"
    if not cfg.train.checkpoint_fallback:
        raise CheckpointError(f"{problem}; set train.checkpoint_fallback=true to resume from the newest older good "
                              f"checkpoint, or move the run directory aside to start over")
    for candidate in complete_tags(run_dir):
        if (tag is None or candidate < tag) and not verify_checksums(run_dir / candidate):
            if _rank() == 0:
                print(f"[train] {problem}; falling back to {run_dir / candidate} (train.checkpoint_fallback)",
                      flush=True)
            return candidate
    raise CheckpointError(f"{problem}; no older checkpoint in {run_dir} passes its checksums either")


def check_architecture(cfg: Config, step_dir: Path) -> None:
    """Refuse a checkpoint whose ``model`` section differs from ``cfg.model``: one line naming the key."""
    saved = load_config(step_dir / "config.yaml").model
    for key, value in asdict(cfg.model).items():
        old = getattr(saved, key)
        if old != value:
            raise ConfigError(f"model.{key}={value!r} but checkpoint {step_dir} was trained with {old!r}; "
                              f"use the checkpoint's architecture or a new train.output_dir")


def resume(engine, cfg: Config) -> TrainState:
    """Collective: load the newest verified checkpoint of ``train.output_dir`` into ``engine`` and this rank's RNG.

    Returns the restored TrainState, or a fresh one when the directory holds no complete checkpoint.
    """
    run_dir = Path(cfg.train.output_dir)
    tag = select_checkpoint(cfg)
    if tag is None:
        return TrainState()
    step_dir = run_dir / tag
    check_architecture(cfg, step_dir)
    saved = json.loads((step_dir / STATE_FILE).read_text())
    dp = getattr(engine, "dp_world_size", 1)
    if cfg.parallel.zero_stage > 0 and saved.get("dp_size", dp) != dp:
        raise CheckpointError(f"checkpoint {step_dir} was saved with data-parallel size {saved['dp_size']}, this "
                              f"run has {dp}: ZeRO-{cfg.parallel.zero_stage} partitions the optimizer state by "
                              f"data-parallel rank; resume with {saved['dp_size']} data-parallel ranks (the sample "
                              f"stream does not depend on it), or convert the checkpoint to DeepSpeed's universal "
                              f"format (ds_to_universal) first")
    # DeepSpeed unpickles its own files (weights_only=False): they are ours, their checksums just verified.
    load_path, _ = engine.load_checkpoint(str(run_dir), tag=tag)
    if load_path is None:
        raise CheckpointError(f"checkpoint {step_dir}: DeepSpeed could not load it; move it aside to start over")
    if cfg.parallel.ep > 1 and cfg.parallel.pp == 1 and hasattr(engine.optimizer, "update_lp_params"):
        # DeepSpeed writes the module states from data-parallel rank 0 only, so every EP rank has just loaded
        # rank 0's experts; the ZeRO fp32 partitions hold each rank's own experts: copy them back.
        engine.optimizer.update_lp_params()
    rng_file = step_dir / f"rng_rank_{_rank():05d}.pt"
    if rng_file.is_file():  # absent when the run is resumed on more ranks than it was saved with
        _set_rng_state(torch.load(rng_file, weights_only=True))
    if _rank() == 0:
        print(f"[train] resumed from {step_dir} (step {saved['step']}, {saved['tokens_seen']:,} tokens seen)",
              flush=True)
    known = set(TrainState.__dataclass_fields__)
    return TrainState(**{k: v for k, v in saved.items() if k in known})


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    """A run directory (uses ``latest``) or a step directory -> (run_dir, tag)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path.parent, path.name
    if path.is_dir():
        tag = read_latest(path)
        if tag is not None:
            return path, tag
    raise FileNotFoundError(f"{path}: not a run directory with a complete checkpoint (no `latest`) nor a "
                            f"step_NNNNNNN directory; pass train.output_dir of a run or one of its step_* folders")


def consolidated_state_dict(run_dir: Path, tag: str) -> dict:
    """Full fp32 weights (and buffers) of a checkpoint without tensor/expert/pipeline shards.

    The module states DeepSpeed writes (``mp_rank_00_model_states.pt``) hold the module's weights: in an fp32 run
    these are the master weights themselves (ZeRO 1/2 copy the updated fp32 partitions back into the module), read
    with plain ``torch.load``. In a bf16 run with ZeRO >= 1 the fp32 masters live in the ZeRO partitions, merged
    with DeepSpeed's ``zero_to_fp32``.
    """
    step_dir = run_dir / tag
    cfg = load_config(step_dir / "config.yaml")
    if cfg.train.precision == "bf16" and any(step_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag)
    states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def load_model_from_checkpoint(path: str | os.PathLike, trust_unverified: bool = False):
    """(model, config, tokenizer path or None) from a run directory or a step directory, on the CPU in fp32.

    DeepSpeed's ZeRO merge unpickles its files, so the step directory must verify against the ``checksums.json``
    this framework writes (a checkpoint it produced, intact) unless ``trust_unverified`` (the caller vouches)."""
    from pretrain.model import build_model

    run_dir, tag = resolve_checkpoint(path)
    problems = verify_checksums(run_dir / tag, collective=False)
    if problems and not trust_unverified:
        raise CheckpointError(f"{problems[0]}; refusing to unpickle an unverified checkpoint (pass "
                              f"trust_unverified=True only for checkpoints you produced)")
    cfg = load_config(run_dir / tag / "config.yaml")
    model = build_model(cfg.model)
    from parallel.shards import gather_pipeline_state_dict, is_pipeline_checkpoint
    if is_pipeline_checkpoint(run_dir / tag):  # pp > 1, or tp/ep > 1 (parallel/shards.py): shards merged
        state = gather_pipeline_state_dict(run_dir / tag, model)
    else:
        state = consolidated_state_dict(run_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = set(model.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise ValueError(f"checkpoint {run_dir / tag}: weights do not match the model "
                         f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    tokenizer = run_dir / "tokenizer.model"
    if tokenizer.is_file():
        return model.eval(), cfg, str(tokenizer)
    return model.eval(), cfg, cfg.data.tokenizer


# ------------------------------------------------------------------------------------ train.init_from

INIT_FROM_MAY_CHANGE = ("max_position_embeddings", "rope_scaling", "num_nextn_predict_layers", "initializer_range")
"""Model keys a new phase may change against its ``train.init_from`` weights: context extension (sequence length and
RoPE scaling) and the MTP depth (missing MTP modules start fresh, surplus ones are dropped)."""


def init_source(path: str | os.PathLike):
    """(model on the CPU in fp32, its ModelConfig) of ``train.init_from``: a HuggingFace folder (config.json) or a run
    or step directory of this framework."""
    from pretrain.export import from_hf

    if (Path(path) / "config.json").is_file():
        model, model_cfg = from_hf(path)
        return model.float(), model_cfg
    model, cfg, _ = load_model_from_checkpoint(path)
    return model, cfg.model


def load_init_weights(model: torch.nn.Module, cfg: Config) -> None:
    """Copy ``train.init_from``'s weights (expert bias and MTP where present) into the freshly built single-process
    ``model`` before it is parallelized, so every layout slices the same full weights. A model key other than
    ``INIT_FROM_MAY_CHANGE`` that differs is refused in one line naming it."""
    path = cfg.train.init_from
    source, source_cfg = init_source(path)
    for key, value in asdict(cfg.model).items():
        old = getattr(source_cfg, key)
        if key not in INIT_FROM_MAY_CHANGE and old != value:
            raise ConfigError(f"model.{key}={value!r} but train.init_from={path} was trained with {old!r}; a new "
                              f"phase keeps the architecture (only {', '.join(INIT_FROM_MAY_CHANGE)} may change)")
    target = model.state_dict()
    state = {k: v for k, v in source.state_dict().items() if k in target or not k.startswith("mtp.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("mtp.")]
    if missing or unexpected:
        raise CheckpointError(f"train.init_from={path}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {list(unexpected)[:3]})")
    if _rank() == 0:
        print(f"[train] initialised from {path} (fresh optimizer, schedule and data stream)", flush=True)

