"""Checkpoints of a run directory: save (sync or async), automatic resume on any layout, loading the weights back
for export, and offline conversion (``python -m pretrain.checkpoint convert --input STEP_DIR --output DIR
[--layout tp=N,pp=N,ep=N]``).

Layout of ``train.output_dir``::

    config.yaml                 resolved config of the run
    tokenizer.model             copy of the sentencepiece model the data was built with (when known)
    latest                      name of the newest *complete* checkpoint (written last, atomically, by rank 0)
    step_0000100/
        mp_rank_00_model_states.pt, zero_pp_rank_R_mp_rank_00_optim_states.pt   DeepSpeed engine state (sync saves)
        state/                  layout-free state: fp32 masters + Adam moments by parameter name (checkpoint_format)
        trainer_state.json      step, samples consumed, tokens seen, schedule state, loss window, data fingerprint,
                                the layout it was saved in (tp, pp, ep, dp, ZeRO stage, precision)
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

Resume in the saved layout with DeepSpeed's files present uses DeepSpeed's loader; any other resume (another tp,
pp, ep, dp, ZeRO stage or precision; an async or converted checkpoint) loads the layout-free state, resharding it
(``pretrain.checkpoint_format``). ``train.async_save`` snapshots that state to host memory and writes it in a
background thread (``_BackgroundSave``); the same all-gather of write results then publishes ``latest``.
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

from parallel.topology import Topology
from pretrain import faults
from pretrain.checkpoint_format import (INDEX, STATE_DIR, StateReader, describe, layout_of, load_into_engine,
                                        merge_index, snapshot, write_snapshot)
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


def _all_gather(obj, group=None) -> list:
    """Every rank's ``obj`` (pickled by torch.distributed between our own ranks only)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
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

def async_enabled(cfg: Config) -> bool:
    """``train.async_save``; null = on when training on CUDA (see its docstring)."""
    flag = cfg.train.async_save
    return torch.cuda.is_available() if flag is None else flag


def _trainer_state(cfg: Config, state: TrainState, schedule_state: dict, engine_files: bool) -> str:
    layout = layout_of(cfg, _world())
    extra = {"schedule": schedule_state, "dp_size": layout["dp"], "layout": layout, "engine_files": engine_files}
    return json.dumps({**asdict(state), **extra}, indent=1)


def _save_engine_files(engine, cfg: Config, state: TrainState, step_dir: Path) -> None:
    """DeepSpeed's engine files and, for tp/ep > 1 without pipeline stages, our model shards (sync saves only)."""
    engine.save_checkpoint(str(step_dir.parent), tag=step_dir.name, save_latest=False)
    if faults.active("crash_in_save", state.step, _rank()):
        os.kill(os.getpid(), signal.SIGKILL)
    from parallel.shards import needs_model_shards, save_model_shards
    if needs_model_shards(cfg):  # ZeRO's merge cannot rebuild TP/EP shards: export reads these instead
        save_model_shards(engine.module, cfg, step_dir)


def _write_rank_files(snap, rng: dict, texts: dict, cfg: Config, step: int, step_dir: Path) -> tuple[dict, list]:
    """This rank's own files (layout-free slices, RNG; rank 0: trainer state and config); returns (index entries,
    names written)."""
    entries = write_snapshot(snap, step_dir / STATE_DIR)
    if faults.active("crash_in_save", step, _rank()) and async_enabled(cfg):
        os.kill(os.getpid(), signal.SIGKILL)  # the background writer dies half-way
    rng_file = step_dir / f"rng_rank_{_rank():05d}.pt"
    if faults.active("enospc_in_save", step, _rank()):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(rng_file))
    torch.save(rng, rng_file)
    written = [rng_file.name] + [f"{STATE_DIR}/{snap.file}"] * bool(entries)
    if _rank() == 0:
        save_config(cfg, step_dir / "config.yaml")
        for name, text in texts.items():
            (step_dir / name).write_text(text)
        written += ["config.yaml", *texts]
    return entries, written


def _publish(results: list, step_dir: Path, cfg: Config, adam_step) -> None:
    """After every rank reported (``results``: per rank (error, index entries, {file: sha256} or None)): raise one
    CheckpointError naming the failed ranks, else rank 0 writes the index, ``checksums.json`` (when the ranks
    hashed their own files) and ``latest``."""
    run_dir = step_dir.parent
    errors = {r: res[0] for r, res in enumerate(results) if res[0]}
    if errors:
        detail = "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))
        raise CheckpointError(f"saving checkpoint {step_dir} failed on rank(s) {sorted(errors)} ({detail}); "
                              f"`latest` still names {read_latest(run_dir)}, the resume point; free space and "
                              f"restart")
    if _rank() == 0:
        index = merge_index([res[1] for res in results], layout_of(cfg, _world()), adam_step)
        _atomic_write(step_dir / STATE_DIR / INDEX, json.dumps(index, indent=1))
    if results[0][2] is None:  # synchronous: hash the directory collectively
        _barrier()
        write_checksums(step_dir)
        _barrier()
    elif _rank() == 0:
        sums = {k: v for res in results for k, v in res[2].items()}
        sums[f"{STATE_DIR}/{INDEX}"] = _sha256(step_dir / STATE_DIR / INDEX)
        _atomic_write(step_dir / CHECKSUMS, json.dumps({"sha256": dict(sorted(sums.items()))}, indent=1))
    if _rank() == 0:
        _atomic_write(run_dir / "latest", step_dir.name)
        prune_checkpoints(run_dir, cfg.train.keep_last)


class _BackgroundSave:
    """The writer thread of an async save; ``wait`` joins it and raises its error (on every rank)."""

    group = None  # a gloo group of all ranks for the writer's all-gather, apart from the training's collectives

    def __init__(self, step_dir: Path, cfg: Config, work):
        import threading
        if _BackgroundSave.group is None and dist.is_initialized():
            _BackgroundSave.group = dist.new_group(backend="gloo")  # collective: every rank saves at this step
        self.step_dir, self.error = step_dir, None
        self.thread = threading.Thread(target=self._run, args=(work,), name="checkpoint-writer", daemon=True)
        self.thread.start()

    def _run(self, work) -> None:
        try:
            work(self.group)
        except CheckpointError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 (reported by the training thread at its next save)
            self.error = CheckpointError(f"saving checkpoint {self.step_dir}: {type(e).__name__}: {e}")

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


_pending: _BackgroundSave | None = None


def wait_for_pending_save() -> None:
    """Block until the background save in flight (if any) has published ``latest``; raise its error."""
    global _pending
    pending, _pending = _pending, None
    if pending is not None:
        pending.wait()


def save_checkpoint(engine, cfg: Config, state: TrainState, schedule_state: dict) -> Path:
    """Collective: every rank writes its files; then checksums, then rank 0 publishes ``latest``. A write error on
    any rank (disk full, ...) raises CheckpointError on every rank, naming the ranks; ``latest`` keeps naming the
    previous checkpoint. With ``train.async_save`` this returns once the state is in host memory; the files,
    checksums and ``latest`` follow in a background thread (errors surface at the next save or
    ``wait_for_pending_save``)."""
    global _pending
    wait_for_pending_save()
    run_dir = Path(cfg.train.output_dir)
    step_dir = run_dir / tag_for(state.step)
    if _rank() == 0 and step_dir.is_dir() and read_latest(run_dir) != step_dir.name:
        shutil.rmtree(step_dir)  # left behind by a save that crashed: start it afresh
    _barrier()
    topo = Topology.from_config(cfg, _world(), _rank())
    snap = snapshot(engine, cfg, topo)  # collective (ZeRO fragments); host memory
    background = async_enabled(cfg)
    texts = {STATE_FILE: _trainer_state(cfg, state, schedule_state, engine_files=not background)}
    rng = _rng_state()

    def work(group, error=None):
        entries, sums = {}, None
        try:
            if error is None:
                step_dir.mkdir(parents=True, exist_ok=True)
                entries, written = _write_rank_files(snap, rng, texts, cfg, state.step, step_dir)
                sums = {name: _sha256(step_dir / name) for name in written} if background else None
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        # The all-gather is also the barrier: every rank has written before rank 0 publishes.
        _publish(_all_gather((error, entries, sums), group), step_dir, cfg, snap.adam_step)

    if background:
        _pending = _BackgroundSave(step_dir, cfg, work)
        return step_dir
    error = None
    try:
        # save_latest=False: DeepSpeed would write `latest` before the other ranks are known to be done.
        _save_engine_files(engine, cfg, state, step_dir)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    work(None, error)
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

    Same layout and DeepSpeed's engine files present: DeepSpeed's loader. Otherwise (another tp/pp/ep/dp/ZeRO
    stage/precision, or an async or converted checkpoint): the layout-free state, resharded while loading
    (``pretrain.checkpoint_format``). Returns the restored TrainState, or a fresh one when the directory holds no
    complete checkpoint.
    """
    run_dir = Path(cfg.train.output_dir)
    tag = select_checkpoint(cfg)
    if tag is None:
        return TrainState()
    step_dir = run_dir / tag
    check_architecture(cfg, step_dir)
    saved = json.loads((step_dir / STATE_FILE).read_text())
    layout, saved_layout = layout_of(cfg, _world()), saved.get("layout")
    if saved_layout is None and cfg.parallel.zero_stage > 0 and saved.get("dp_size", layout["dp"]) != layout["dp"]:
        raise CheckpointError(f"checkpoint {step_dir} predates layout-free checkpoints and was saved with "
                              f"data-parallel size {saved.get('dp_size')}, this run has {layout['dp']}: ZeRO "
                              f"partitions its optimizer state by rank; resume it with {saved.get('dp_size')} "
                              f"data-parallel ranks")
    if saved.get("engine_files", True) and saved_layout in (None, layout):
        _load_engine_files(engine, cfg, run_dir, tag)
        same_ranks = True
    else:
        if saved_layout != layout and _rank() == 0:
            print(f"[train] checkpoint {step_dir} was saved with {describe(saved_layout or {})}; this run has "
                  f"{describe(layout)}: resharding while loading", flush=True)
        try:
            load_into_engine(engine, Topology.from_config(cfg, _world(), _rank()), step_dir / STATE_DIR)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"checkpoint {step_dir}: {e}") from None
        engine.global_steps, engine.global_samples = saved["step"], saved["consumed_samples"]
        same_ranks = saved_layout == layout
    rng_file = step_dir / f"rng_rank_{_rank():05d}.pt"
    if same_ranks and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:  # another layout: rank r's stream has no counterpart; reseed from the step (deterministic per layout)
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(cfg.train.seed + _rank() + 1_000_003 * saved["step"])
    if _rank() == 0:
        print(f"[train] resumed from {step_dir} (step {saved['step']}, {saved['tokens_seen']:,} tokens seen)",
              flush=True)
    known = set(TrainState.__dataclass_fields__)
    return TrainState(**{k: v for k, v in saved.items() if k in known})


def _load_engine_files(engine, cfg: Config, run_dir: Path, tag: str) -> None:
    """DeepSpeed's loader, for a checkpoint of this very layout."""
    # DeepSpeed unpickles its own files (weights_only=False): they are ours, their checksums just verified.
    load_path, _ = engine.load_checkpoint(str(run_dir), tag=tag)
    if load_path is None:
        raise CheckpointError(f"checkpoint {run_dir / tag}: DeepSpeed could not load it; move it aside to start over")
    if cfg.parallel.ep > 1 and cfg.parallel.pp == 1 and hasattr(engine.optimizer, "update_lp_params"):
        # DeepSpeed writes the module states from data-parallel rank 0 only, so every EP rank has just loaded
        # rank 0's experts; the ZeRO fp32 partitions hold each rank's own experts: copy them back.
        engine.optimizer.update_lp_params()


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
    if (run_dir / tag / STATE_DIR / INDEX).is_file():  # the layout-free fp32 masters, any layout
        state = StateReader(run_dir / tag / STATE_DIR).state_dict()
    elif is_pipeline_checkpoint(run_dir / tag):  # pp > 1, or tp/ep > 1 (parallel/shards.py): shards merged
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


# ------------------------------------------------------------------------------------- offline conversion

def parse_layout(text: str | None) -> dict:
    """'tp=2,pp=1,ep=4' -> {'tp': 2, 'pp': 1, 'ep': 4} (missing degrees are 1)."""
    layout = {"tp": 1, "pp": 1, "ep": 1}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in layout or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--layout {text!r}: expected tp=N,pp=N,ep=N with positive integers")
        layout[key.strip()] = int(value)
    return layout


def convert_checkpoint(step_dir: str | os.PathLike, output: str | os.PathLike, layout: dict) -> Path:
    """Single process, no process group: the layout-free state of ``step_dir`` cut for ``layout`` (tp/pp/ep) into
    the run directory ``output`` (its step directory, ``latest`` and config); a run started there in that layout
    (any dp, ZeRO stage) resumes from it. Returns the new step directory."""
    from dataclasses import replace

    from parallel.topology import check_pipeline_layout
    from pretrain.checkpoint_format import write_layout

    step_dir, output = Path(step_dir), Path(output)
    if not (step_dir / STATE_FILE).is_file():
        raise FileNotFoundError(f"{step_dir}: not a step_NNNNNNN checkpoint directory (no {STATE_FILE})")
    problems = verify_checksums(step_dir, collective=False)
    if problems:
        raise CheckpointError(f"{problems[0]}; convert only an intact checkpoint")
    reader = StateReader(step_dir / STATE_DIR)
    cfg = load_config(step_dir / "config.yaml")
    keep = cfg.parallel.pipeline_layout if cfg.parallel.pipeline_layout and len(
        cfg.parallel.pipeline_layout) == layout["pp"] else None
    cfg = replace(cfg, parallel=replace(cfg.parallel, **layout, pipeline_layout=keep))
    bounds = [0, cfg.model.num_hidden_layers]
    if layout["pp"] > 1:
        from parallel.pipeline import stage_bounds
        from pretrain.model import build_model
        check_pipeline_layout(cfg)
        with torch.device("meta"):
            bounds = stage_bounds(build_model(cfg.model), cfg)
    out_step = output / step_dir.name
    if out_step.exists():
        raise FileExistsError(f"{out_step} exists; choose an empty --output directory")
    index = write_layout(reader, out_step / STATE_DIR, layout["tp"], layout["ep"], bounds)
    (out_step / STATE_DIR / INDEX).write_text(json.dumps(index, indent=1))
    saved = json.loads((step_dir / STATE_FILE).read_text())
    saved.update(layout={**layout, "dp": None, "zero_stage": cfg.parallel.zero_stage,
                         "precision": cfg.train.precision}, engine_files=False)
    (out_step / STATE_FILE).write_text(json.dumps(saved, indent=1))
    save_config(cfg, out_step / "config.yaml")
    save_config(cfg, output / "config.yaml")
    if (step_dir.parent / "tokenizer.model").is_file():
        shutil.copyfile(step_dir.parent / "tokenizer.model", output / "tokenizer.model")
    write_checksums(out_step)
    _atomic_write(output / "latest", out_step.name)
    return out_step


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m pretrain.checkpoint", description="Checkpoint tools.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="cut a checkpoint's layout-free state for another layout (offline)")
    c.add_argument("--input", required=True, help="a step_NNNNNNN directory (or a run directory: its latest)")
    c.add_argument("--output", required=True, help="a new run directory")
    c.add_argument("--layout", default=None, help="tp=N,pp=N,ep=N (default: tp=1,pp=1,ep=1, whole tensors)")
    args = p.parse_args(argv)
    try:
        run_dir, tag = resolve_checkpoint(args.input)
        out = convert_checkpoint(run_dir / tag, args.output, parse_layout(args.layout))
    except (CheckpointError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    print(f"[checkpoint] {run_dir / tag} -> {out} ({args.layout or 'tp=1,pp=1,ep=1'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
