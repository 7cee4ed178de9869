"""The layout-free checkpoint state: what resumes a run on any (tp, pp, ep, dp, ZeRO stage) layout.

Per tensor of the plain model (state-dict names of ``build_model``), the full logical tensor in fp32 (the master
weight; buffers such as the routers' ``e_score_correction_bias`` as they are) and its Adam ``exp_avg`` and
``exp_avg_sq``, in sharded safetensors files::

    step_NNNNNNN/state/
        index.json                    {"format", "layout", "adam_step",
                                       "tensors": {name: {"shape", "dtype", "moments", "slices": [{"file", "offsets",
                                                                                                   "shape"}]}}}
        tp00-pp00-ep00.safetensors    the slices one rank wrote: NAME (fp32 master), NAME:exp_avg, NAME:exp_avg_sq

Why ours rather than DeepSpeed's universal checkpoint (``ds_to_universal`` + ``load_universal``): its converter
reads DeepSpeed's own files, which do not hold what our layouts need: the module files of an expert-parallel run
hold EP rank 0's experts only (``parallel/pipeline.py``, ``parallel/shards.py`` write the others separately), its
TP merge needs Megatron's per-parameter patterns (``UNIVERSAL_CHECKPOINT_INFO``) that megatron-core layers copied
into our model do not provide, and its pipeline loader assumes one DeepSpeed layer per transformer block, where
ours is one per stage. Keyed by the plain model's names and read by overlap, the format below needs no such map.

Saving (collective, ``snapshot``): every rank walks its own stage's tensors in the same order; under ZeRO 1/2 and
the bf16 optimizer the fp32 master and moments of a parameter are spread over the data-parallel ranks (DeepSpeed's
fragment API, ``deepspeed.utils.tensor_fragment``: ``safe_get_full_fp32_param``/``safe_get_full_optimizer_state``
all-reduce the fragments over the parameter's data-parallel group, the expert-data-parallel group for experts);
one replica keeps it: data-parallel rank 0 (expert-data-parallel rank 0 for experts), TP rank 0 for tensors TP
does not split. So each writing rank holds its own model-parallel slice, nothing more, and writes one file.

Loading (``load_into_engine``): each rank computes the slice of every tensor it holds in the new layout
(``parallel.shards.slice_box``) and reads only the overlapping parts of the saved slices
(``safe_open(...).get_slice``): no rank reads or holds more than its own slice. Adam's state is created (zeros,
the saved step) and the slices go in through ``safe_set_full_fp32_param``/``safe_set_full_optimizer_state``
(each rank keeps its own fragment) or, under ZeRO 0 in fp32, straight into the parameter and ``optimizer.state``.
Values are copied, never recomputed: the fp32 masters and moments after loading equal the saved ones bit for bit.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from parallel.shards import slice_box, split_dims

FORMAT = "pretrain-layout-free/1"
STATE_DIR = "state"
INDEX = "index.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def full_shapes(model_cfg) -> dict[str, list[int]]:
    """Shapes of the plain model's state dict (built on the meta device: no memory; once per architecture)."""
    from dataclasses import asdict
    return _full_shapes(json.dumps(asdict(model_cfg), sort_keys=True))


@functools.lru_cache(maxsize=4)
def _full_shapes(model_json: str) -> dict[str, list[int]]:
    from pretrain.config import ModelConfig
    from pretrain.model import build_model
    with torch.device("meta"):
        model = build_model(ModelConfig(**json.loads(model_json)))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def stage_module(engine) -> nn.Module:
    """The module whose state-dict names are the plain model's: the pipeline stage, or the (TP/EP) model."""
    module = engine.module
    return module.stage if hasattr(module, "forward_funcs") else module


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's ZeRO / bf16 wrapper (ZeRO 0 in fp32: the engine's optimizer itself)."""
    inner = getattr(engine.optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else engine.optimizer


def _adam_step(base: torch.optim.Optimizer) -> float | None:
    """Adam's step count (the same for every parameter: a skipped step skips all), None before the first step."""
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    return max(steps) if steps else None


def _link_moments(engine) -> None:
    """(Re)link every parameter's ZeRO / bf16-optimizer fragment to Adam's state. DeepSpeed links them once, right
    after the first parameter group's step, when the other groups' state does not exist yet: their fragments
    would have no ``exp_avg``."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _is_expert(name: str, ep: int) -> bool:
    return ep > 1 and split_dims(name)[1] is not None


def is_writer(name: str, topo) -> bool:
    """One replica writes each slice: data-parallel rank 0 (expert-data-parallel rank 0 for experts), and only TP
    rank 0 for tensors TP does not split."""
    replica = topo.edp_rank == 0 if _is_expert(name, topo.ep) else topo.dp_rank == 0
    return replica and (topo.tp_rank == 0 or (topo.tp > 1 and split_dims(name)[0] is not None))


def file_name(tp_rank: int, pp_rank: int, ep_rank: int) -> str:
    return f"tp{tp_rank:02d}-pp{pp_rank:02d}-ep{ep_rank:02d}.safetensors"


def layout_of(cfg, world_size: int) -> dict:
    """What a checkpoint's sharding depends on; a resume whose layout differs reshards."""
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "ep": p.ep, "dp": world_size // (p.tp * p.pp), "zero_stage": p.zero_stage,
            "precision": cfg.train.precision}


def describe(layout: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items())


# ------------------------------------------------------------------------------------------------- save

@dataclass
class Snapshot:
    """One rank's share of a checkpoint's layout-free state, in host memory (what an async save writes later)."""

    file: str
    tensors: dict = field(default_factory=dict)  # safetensors key -> CPU tensor
    entries: dict = field(default_factory=dict)  # name -> {"shape", "dtype", "moments", "offsets", "slice"}
    adam_step: float | None = None


def _flat_masters(engine) -> dict[int, tuple[torch.Tensor, int]]:
    """id(parameter) -> (its fp32 master tensor, offset in it) under DeepSpeed's FP16 optimizers (bf16 under ZeRO 0
    without pipeline stages): unpartitioned fp32 copies, one flat tensor per group (fused) or one per parameter."""
    opt = engine.optimizer
    if not hasattr(opt, "fp16_groups"):
        return {}
    out = {}
    if hasattr(opt, "fp32_groups_flat"):
        for params, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            offset = 0
            for p in params:
                out[id(p)] = (flat, offset)
                offset += p.numel()
    else:
        for params, masters in zip(opt.fp16_groups, opt.fp32_groups):
            out.update({id(p): (m, 0) for p, m in zip(params, masters)})
    return out


def _views(p: torch.Tensor, flat: torch.Tensor, offset: int, base) -> dict[str, torch.Tensor]:
    """The master and moments of ``p`` as views into its group's flat tensors (FP16_Optimizer)."""
    view = lambda t: t.view(-1).narrow(0, offset, p.numel()).view(p.shape)  # noqa: E731
    state = base.state.get(flat, {})
    return {"": view(flat), **{f":{k}": view(state[k]) for k in MOMENTS if k in state}}


def _master_and_moments(p: torch.Tensor, base, linked: bool, flat=None) -> dict[str, torch.Tensor]:
    """{"": fp32 master, ":exp_avg": ..., ":exp_avg_sq": ...} of this rank's (TP/EP) slice of parameter ``p``.
    Collective over the parameter's data-parallel group under ZeRO 1/2 and the bf16 optimizer."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if flat is not None:
        return _views(p, *flat, base)
    if hasattr(p, "_hp_mapping"):
        out = {"": safe_get_full_fp32_param(p)}
        if linked:
            out.update({f":{k}": safe_get_full_optimizer_state(p, k) for k in MOMENTS})
        return out
    state = base.state.get(p, {})
    out = {"": p.detach().float()}
    if linked and all(k in state for k in MOMENTS):
        out.update({f":{k}": state[k] for k in MOMENTS})
    return out


@torch.no_grad()
def snapshot(engine, cfg, topo) -> Snapshot:
    """Collective: this rank's slices of every fp32 master, Adam moment and buffer, copied to host memory."""
    module, base = stage_module(engine), _base_optimizer(engine)
    full = full_shapes(cfg.model)
    adam_step = _adam_step(base)
    linked = adam_step is not None  # Adam's state exists after the first step (on every rank alike)
    if linked:
        _link_moments(engine)
    snap = Snapshot(file_name(topo.tp_rank, topo.pp_rank, topo.ep_rank), adam_step=adam_step)
    params, flats = {name for name, _ in module.named_parameters()}, _flat_masters(engine)
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name not in full:
            raise AssertionError(f"{name}: not a tensor of the plain model (state-dict names must stay the plain "
                                 f"model's)")
        offsets, shape = slice_box(name, full[name], topo.tp, topo.tp_rank, topo.ep, topo.ep_rank)
        if list(tensor.shape) != shape:
            raise AssertionError(f"{name}: local shape {list(tensor.shape)} but the partition plan "
                                 f"(parallel.shards.split_dims) gives {shape}: update the plan")
        values = (_master_and_moments(tensor, base, linked, flats.get(id(tensor))) if name in params
                  else {"": tensor.detach()})
        if not is_writer(name, topo) or name in snap.entries:  # tied weights appear twice in a state dict
            continue
        for key, value in values.items():
            snap.tensors[name + key] = value.detach().to("cpu", copy=True).contiguous()
        snap.entries[name] = {"shape": full[name], "dtype": str(values[""].dtype).removeprefix("torch."),
                              "moments": len(values) > 1, "offsets": offsets, "slice": shape}
    return snap


def write_snapshot(snap: Snapshot, state_dir: Path) -> dict:
    """Write this rank's file (if it holds any slice); returns its index entries."""
    from safetensors.torch import save_file

    if not snap.tensors:
        return {}
    state_dir.mkdir(parents=True, exist_ok=True)
    save_file(snap.tensors, str(state_dir / snap.file))
    return {name: {**e, "file": snap.file} for name, e in snap.entries.items()}


def merge_index(per_rank: list[dict], layout: dict, adam_step: float | None) -> dict:
    """The index from every rank's entries: one slice per (tensor, offsets); every tensor fully covered."""
    tensors: dict[str, dict] = {}
    for entries in per_rank:
        for name, e in entries.items():
            t = tensors.setdefault(name, {"shape": e["shape"], "dtype": e["dtype"], "moments": e["moments"],
                                          "slices": []})
            if all(s["offsets"] != e["offsets"] for s in t["slices"]):
                t["slices"].append({"file": e["file"], "offsets": e["offsets"], "shape": e["slice"]})
    for name, t in tensors.items():
        covered = sum(math.prod(s["shape"]) for s in t["slices"])
        assert covered == math.prod(t["shape"]), f"{name}: slices cover {covered} of {math.prod(t['shape'])} values"
    return {"format": FORMAT, "layout": layout, "adam_step": adam_step, "tensors": dict(sorted(tensors.items()))}


# ------------------------------------------------------------------------------------------------- read

class StateReader:
    """Reads any box of a saved tensor from the slices that overlap it (only those bytes are read)."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        path = self.state_dir / INDEX
        try:
            self.index = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{path}: no layout-free state ({type(e).__name__}); the checkpoint was written "
                                    f"before elastic checkpoints, resume it in the layout it was saved in") from None
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.tensors = self.index["tensors"]
        self._files: dict[str, object] = {}

    def _file(self, name: str):
        from safetensors import safe_open
        if name not in self._files:
            self._files[name] = safe_open(str(self.state_dir / name), framework="pt", device="cpu")
        return self._files[name]

    def region(self, name: str, key: str = "", offsets=None, shape=None) -> torch.Tensor:
        """The box [offsets, offsets + shape) of tensor ``name`` (``key``: "" master, ":exp_avg", ...); the
        whole tensor by default."""
        entry = self.tensors[name]
        shape = list(entry["shape"] if shape is None else shape)
        offsets = [0] * len(shape) if offsets is None else list(offsets)
        out = torch.empty(shape, dtype=getattr(torch, entry["dtype"]))
        covered = 0
        for s in entry["slices"]:
            lo = [max(a, b) for a, b in zip(offsets, s["offsets"])]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, shape, s["offsets"], s["shape"])]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            if shape:
                src = self._file(s["file"]).get_slice(name + key)[tuple(slice(l - b, h - b) for l, h, b in
                                                                        zip(lo, hi, s["offsets"]))]
                out[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offsets))] = src
            else:
                out.copy_(self._file(s["file"]).get_tensor(name + key))
            covered += math.prod(h - l for l, h in zip(lo, hi))
        if covered != math.prod(shape):
            raise ValueError(f"{self.state_dir}: {name}{key}: the saved slices cover {covered} of "
                             f"{math.prod(shape)} values of the box at {offsets}")
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every full tensor (single process: export, conversion, tests)."""
        return {name: self.region(name) for name in self.tensors}


# ------------------------------------------------------------------------------------------------- load

def _init_adam_state(base: torch.optim.Optimizer, step: float) -> None:
    """Adam's state for every parameter of the (fresh) optimizer: zero moments, the saved step count, created
    the way torch's AdamW creates it (fused: the step on the parameter's device)."""
    for group in base.param_groups:
        device_step = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = base.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if device_step else "cpu")
            state["step"].fill_(step)


@torch.no_grad()
def load_into_engine(engine, topo, state_dir: Path) -> dict:
    """Load this rank's slices of the layout-free state into ``engine`` (any layout); returns the index.

    Not collective: each rank reads its own slices (and its own ZeRO fragments of them)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    reader = StateReader(state_dir)
    module, base = stage_module(engine), _base_optimizer(engine)
    step = reader.index["adam_step"]
    if step is not None:
        _init_adam_state(base, step)
        _link_moments(engine)
    params, flats = {name for name, _ in module.named_parameters()}, _flat_masters(engine)
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name not in reader.tensors:
            raise ValueError(f"{state_dir / INDEX}: no tensor {name}; the checkpoint is of another architecture")
        offsets, shape = slice_box(name, reader.tensors[name]["shape"], topo.tp, topo.tp_rank, topo.ep, topo.ep_rank)
        master = reader.region(name, "", offsets, shape)
        tensor.data.copy_(master)  # the module's weight (under ZeRO 0 in fp32 the master itself), or the buffer
        if name not in params:
            continue
        moments = ({k: reader.region(name, f":{k}", offsets, shape) for k in MOMENTS}
                   if step is not None and reader.tensors[name]["moments"] else {})
        if id(tensor) in flats:  # FP16_Optimizer: views into the flat master and moments
            for key, view in _views(tensor, *flats[id(tensor)], base).items():
                if key == "" or key[1:] in moments:
                    view.copy_(master if key == "" else moments[key[1:]])
        elif hasattr(tensor, "_hp_mapping"):  # ZeRO 1/2, bf16 optimizer: each rank keeps its own fragment
            safe_set_full_fp32_param(tensor, master.to(tensor.device))
            for k, v in moments.items():
                safe_set_full_optimizer_state(tensor, v.to(tensor.device), k)
        else:
            for k, v in moments.items():
                base.state[tensor][k].copy_(v)
    return reader.index


# ----------------------------------------------------------------------------------- offline conversion

def stage_of(name: str, bounds: list[int]) -> int:
    """The pipeline stage owning tensor ``name`` (``bounds``: ``parallel.pipeline.stage_bounds``): the embedding
    on stage 0, layer i on the stage whose bounds hold it, norm/head/MTP on the last."""
    pp = len(bounds) - 1
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        return next(s for s in range(pp) if bounds[s] <= layer < bounds[s + 1])
    return 0 if name.startswith("embed_tokens.") else pp - 1


def write_layout(reader: StateReader, state_dir: Path, tp: int, ep: int, bounds: list[int]) -> dict:
    """Cut every tensor of ``reader`` into the files the writers of a (tp, pp = len(bounds) - 1, ep) run would
    write; one output file in memory at a time. Returns the index."""
    from safetensors.torch import save_file

    plan: dict[str, list] = {}  # file -> [(name, offsets, shape)]
    for name, t in reader.tensors.items():
        tp_dim, ep_dim = split_dims(name)
        for tp_rank in range(tp if tp_dim is not None else 1):
            for ep_rank in range(ep if ep_dim is not None else 1):
                offsets, shape = slice_box(name, t["shape"], tp, tp_rank, ep, ep_rank)
                plan.setdefault(file_name(tp_rank, stage_of(name, bounds), ep_rank), []).append((name, offsets, shape))
    state_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    for file, items in sorted(plan.items()):
        tensors = {}
        for name, offsets, shape in items:
            keys = [""] + [f":{k}" for k in MOMENTS] * bool(reader.tensors[name]["moments"])
            tensors.update({name + key: reader.region(name, key, offsets, shape) for key in keys})
            t = reader.tensors[name]
            entries.setdefault(file, {})[name] = {"shape": t["shape"], "dtype": t["dtype"], "moments": t["moments"],
                                                  "offsets": offsets, "slice": shape, "file": file}
        save_file(tensors, str(state_dir / file))
    layout = {"tp": tp, "pp": len(bounds) - 1, "ep": ep}
    return merge_index(list(entries.values()), layout, reader.index["adam_step"])
