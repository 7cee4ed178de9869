"""Layout planner: the (tp, pp, ep, dp, ZeRO, micro-batch, checkpointing) layouts that fit, ranked by step time.

    python -m pretrain.plan --config deepseek-v3 --gpus 2048 --gpu-memory 80GiB [--gpus-per-node 8]
                            [--gpu h800|h100] [--peak-tflops T] [--mfu F] [--intra-node-gbps B]
                            [--inter-node-gbps B] [--top N] [--json] [section.key=value ...]

Every layout the model can be cut into (``parallel.topology.check_layout``) is sized with ``pretrain.info``'s
per-rank memory (the busiest pipeline stage) and timed with the same FLOPs and bytes model:

    step = compute x (m + p - 1) / m  +  TP + PP communication  +  max(0, EP + DP communication - compute)

- compute: the training FLOPs per token (``flops_per_token``, MTP included; with pipeline stages the busiest
  stage's share, stages cut as the trainer cuts them; x 4/3 under full recomputation, + the attention core's
  forward under selective) x tokens per step / GPUs per stage, at ``--mfu`` of ``--peak-tflops``;
- (p - 1) / (m + p - 1) is the 1F1B pipeline bubble, m = micro-batches per step per pipeline;
- communication: ``comm_bytes_by_group`` at the link each group uses: TP inside a node (NVLink,
  ``--intra-node-gbps``), an EP / DP group or a stage boundary that spans nodes at ``--inter-node-gbps``
  (InfiniBand, per GPU), the share inside one node at NVLink speed. TP and pipeline transfers sit on the critical
  path; the all-to-alls and the ZeRO reduction overlap computation (DeepSeek-V3's DualPipe, DeepSpeed's bucketed
  reduction) and only what exceeds it counts.

Bandwidths are gigabytes (not bits) per second per GPU. Defaults: ``--gpu h800`` (989 dense bf16 TFLOPS, NVLink
160 GB/s and InfiniBand 50 GB/s as achieved in the DeepSeek-V3 report) and ``--mfu 0.4``; ``--gpu h100`` has
NVLink 450 GB/s. A layout fits when its estimate is at most ``--gpu-memory`` less ``--reserve`` (CUDA context,
fragmentation). Nothing fitting: the smallest GPU count (a multiple of the node size) that has a fitting layout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass

from pretrain.config import Config, ConfigError, load_config

GPUS = {"h800": {"peak_tflops": 989.0, "intra_node_gbps": 160.0, "inter_node_gbps": 50.0},
        "h100": {"peak_tflops": 989.0, "intra_node_gbps": 450.0, "inter_node_gbps": 50.0}}
ZERO_STAGES = (0, 1, 2)
MICRO_BATCHES = (1, 2, 4)
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class Hardware:
    """The cluster: GPU count and memory, node size, peak FLOP/s, the MFU reached, link bandwidths (bytes/s)."""

    gpus: int
    gpu_memory: float
    gpus_per_node: int = 8
    peak_flops: float = 989e12
    mfu: float = 0.4
    intra_node_bw: float = 160e9
    inter_node_bw: float = 50e9
    reserve: float = 0.08


def parse_bytes(text: str) -> float:
    """``80GiB``, ``80GB``, ``81920MiB`` or a plain number of bytes."""
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20,
             "gib": 2 ** 30, "tib": 2 ** 40}
    match = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match[2].lower() not in units:
        raise ConfigError(f"--gpu-memory={text!r}: give a size such as 80GiB, 80GB or 85899345920")
    return float(match[1]) * units[match[2].lower()]


def _divisors_pow2(n: int, limit: int) -> list[int]:
    return [d for d in (2 ** i for i in range(16)) if d <= limit and n % d == 0]


def candidate_degrees(cfg: Config, gpus: int, gpus_per_node: int) -> list[tuple[int, int, int, int]]:
    """(tp, pp, ep, dp) the model can be cut into on ``gpus``: tp a power of two inside a node, any pp up to the
    layer count, ep a power of two dividing dp and the experts (``check_layout`` has the last word)."""
    from parallel.topology import Topology, check_layout

    m, out = cfg.model, []
    for tp in _divisors_pow2(gpus, gpus_per_node):
        for pp in range(1, min(m.num_hidden_layers, gpus // tp) + 1):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for ep in (_divisors_pow2(dp, m.n_routed_experts) if m.is_moe else [1]):
                try:
                    check_layout(m, Topology(world_size=gpus, tp=tp, pp=pp, ep=ep))
                except ConfigError:
                    continue
                out.append((tp, pp, ep, dp))
    return out


def _variant(cfg: Config, zero: int, micro: int, ckpt: str, tp: int, pp: int, ep: int) -> Config:
    return dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, tp=tp, pp=pp, ep=ep, zero_stage=zero),
        train=dataclasses.replace(cfg.train, micro_batch_size=micro, activation_checkpointing=ckpt))


def _link_time(nbytes: float, span: int, hw: Hardware) -> float:
    """Seconds to move ``nbytes`` within a group spanning ``span`` consecutive GPUs: the share leaving the node
    at InfiniBand speed, the rest over NVLink."""
    off_node = max(0.0, 1.0 - hw.gpus_per_node / span) if span > hw.gpus_per_node else 0.0
    return nbytes * (off_node / hw.inter_node_bw + (1 - off_node) / hw.intra_node_bw)


def step_time(cfg: Config, inv, tp: int, pp: int, ep: int, dp: int, hw: Hardware,
              layer_stage: list[int] | None = None) -> dict:
    """Seconds per optimizer step and its parts for one layout (``cfg`` carries ZeRO, micro-batch, checkpointing;
    ``layer_stage``: ``pretrain.info.pipeline_stages``, computed when not given)."""
    from pretrain.info import _attention_flops_fwd, comm_bytes_by_group, flops_per_token, pipeline_stages

    m, t, seq = cfg.model, cfg.train, cfg.data.seq_length
    tokens = t.global_batch_size * seq
    layer_stage = layer_stage or pipeline_stages(cfg, inv, pp, tp, ep)
    flops = _busiest_stage_flops(cfg, layer_stage, pp) if pp > 1 else flops_per_token(m, seq)
    if t.activation_checkpointing == "full":
        flops *= 4 / 3  # one more forward
    elif t.activation_checkpointing == "selective":  # the attention core's forward again
        core = _attention_flops_fwd(m, seq) - _attention_flops_fwd(m, 0)
        flops += core * (m.num_hidden_layers + m.num_nextn_predict_layers) / pp
    compute = flops * tokens / (hw.gpus / pp) / (hw.peak_flops * hw.mfu)  # a stage's share on its tp x dp GPUs
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    bubble = (pp - 1) / (micro + pp - 1)
    groups = comm_bytes_by_group(cfg, inv, tp, pp, ep, dp, layer_stage=layer_stage)
    spans = {"tp": tp, "ep": tp * ep, "dp": tp * dp, "pp": tp * dp * 2}  # consecutive GPUs a group covers
    comm = {g: _link_time(sum(kinds.values()), spans[g], hw) for g, kinds in groups.items()}
    exposed = comm["tp"] + comm["pp"] + max(0.0, comm["ep"] + comm["dp"] - compute)
    total = compute / (1 - bubble) + exposed
    return {"step_s": total, "compute_s": compute, "bubble": bubble, "comm_s": comm, "exposed_comm_s": exposed,
            "gpu_hours_per_trillion_tokens": hw.gpus * total / 3600 * 1e12 / tokens,
            "tokens_per_s_per_gpu": tokens / total / hw.gpus}


def _busiest_stage_flops(cfg: Config, layer_stage: list[int], pp: int) -> float:
    """Training FLOPs per token of the slowest pipeline stage (the step waits for it): its blocks, and on the last
    stage the head and the MTP modules (``pretrain.info``'s counts, stages cut as the trainer cuts them)."""
    from pretrain.info import _attention_flops_fwd, _ffn_flops_fwd, _layer_is_moe, flops_breakdown

    m, seq = cfg.model, cfg.data.seq_length
    per_stage = [0.0] * pp
    for i, s in enumerate(layer_stage):
        per_stage[s] += 3 * (_attention_flops_fwd(m, seq) + _ffn_flops_fwd(m, _layer_is_moe(m, i)))
    per_stage[-1] += 3 * 2.0 * m.hidden_size * m.vocab_size + flops_breakdown(m, seq)["mtp"]
    return max(per_stage)


def plan(cfg: Config, hw: Hardware, first_fit_only: bool = False) -> list[dict]:
    """Every fitting layout with its memory and step-time estimate, fastest first."""
    from pretrain.info import analytic_inventory, pipeline_stages, stage_memory, stage_param_counts

    inv = analytic_inventory(cfg.model)
    limit = hw.gpu_memory * (1 - hw.reserve)
    rows = []
    for tp, pp, ep, dp in candidate_degrees(cfg, hw.gpus, hw.gpus_per_node):
        layer_stage = pipeline_stages(cfg, inv, pp, tp, ep)
        counts = stage_param_counts(inv, layer_stage, pp)
        stage_layers = [[i for i, st in enumerate(layer_stage) if st == s] for s in range(pp)]
        for zero in ZERO_STAGES:
            for micro in MICRO_BATCHES:
                if cfg.train.global_batch_size % (micro * dp):
                    continue
                for ckpt in CHECKPOINTING:
                    c = _variant(cfg, zero, micro, ckpt, tp, pp, ep)
                    memory = max(stage_memory(c, counts[s], s, stage_layers[s], tp, pp, ep, dp)["total_bytes"]
                                 for s in range(pp))
                    if memory > limit:
                        continue
                    row = {"tp": tp, "pp": pp, "ep": ep, "dp": dp, "zero_stage": zero, "micro_batch_size": micro,
                           "activation_checkpointing": ckpt, "memory_per_rank_bytes": memory}
                    if first_fit_only:
                        return [row]
                    rows.append({**row, **step_time(c, inv, tp, pp, ep, dp, hw, layer_stage)})
    # ties (to 4 digits: communication hidden under compute) go to the layout moving fewer bytes, then the smaller
    return sorted(rows, key=lambda r: (float(f"{r['step_s']:.4g}"), sum(r["comm_s"].values()),
                                       r["memory_per_rank_bytes"]))


def smallest_fitting_gpus(cfg: Config, hw: Hardware, max_factor: int = 64) -> int | None:
    """The fewest GPUs with a fitting layout, a multiple of the node size above ``hw.gpus``, or None up to
    ``max_factor`` x: doubling, then bisection (memory per GPU falls as GPUs are added; divisibility makes that
    only nearly monotone, so the answer is the smallest the bisection meets)."""
    node = hw.gpus_per_node

    def fits(nodes: int) -> bool:
        return bool(plan(cfg, dataclasses.replace(hw, gpus=nodes * node), first_fit_only=True))

    low, high = hw.gpus // node, max(1, hw.gpus // node)  # low never fits
    while not fits(high):
        low, high = high, high * 2
        if high * node > hw.gpus * max_factor:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high * node


def format_plan(rows: list[dict], hw: Hardware, top: int) -> str:
    gib = 2 ** 30
    head = ("| rank | tp | pp | ep | dp | ZeRO | micro | ckpt | GiB/GPU | step s | bubble | exposed comm s | "
            "tokens/s/GPU | GPU-h per 1T tokens |")
    lines = [f"{len(rows)} layouts fit on {hw.gpus} GPUs of {hw.gpu_memory / gib:.0f} GiB "
             f"(MFU {hw.mfu:.0%} of {hw.peak_flops / 1e12:.0f} TFLOPS, NVLink {hw.intra_node_bw / 1e9:.0f} GB/s, "
             f"InfiniBand {hw.inter_node_bw / 1e9:.0f} GB/s per GPU)", "", head, "|" + "---|" * 14]
    for i, r in enumerate(rows[:top], 1):
        lines.append(f"| {i} | {r['tp']} | {r['pp']} | {r['ep']} | {r['dp']} | {r['zero_stage']} | "
                     f"{r['micro_batch_size']} | {r['activation_checkpointing']} | "
                     f"{r['memory_per_rank_bytes'] / gib:.1f} | {r['step_s']:.2f} | {r['bubble']:.1%} | "
                     f"{r['exposed_comm_s']:.2f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{r['gpu_hours_per_trillion_tokens']:,.0f} |")
    return "\n".join(lines)


def hardware_from_args(args) -> Hardware:
    gpu = GPUS[args.gpu]
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError(f"--gpus={args.gpus} --gpus-per-node={args.gpus_per_node}: both must be >= 1")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu={args.mfu}: a fraction in (0, 1]")
    return Hardware(gpus=args.gpus, gpu_memory=parse_bytes(args.gpu_memory), gpus_per_node=args.gpus_per_node,
                    peak_flops=(args.peak_tflops or gpu["peak_tflops"]) * 1e12, mfu=args.mfu,
                    intra_node_bw=(args.intra_node_gbps or gpu["intra_node_gbps"]) * 1e9,
                    inter_node_bw=(args.inter_node_gbps or gpu["inter_node_gbps"]) * 1e9, reserve=args.reserve)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="preset name or YAML path")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-memory", required=True, help="per GPU, e.g. 80GiB")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h800", help="defaults for the three figures below")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU")
    ap.add_argument("--mfu", type=float, default=0.4, help="fraction of the peak the compute reaches")
    ap.add_argument("--intra-node-gbps", type=float, default=None, help="NVLink GB/s (bytes) per GPU")
    ap.add_argument("--inter-node-gbps", type=float, default=None, help="InfiniBand GB/s (bytes) per GPU")
    ap.add_argument("--reserve", type=float, default=0.08, help="memory fraction kept free (context, fragments)")
    ap.add_argument("--top", type=int, default=15, help="rows of the table")
    ap.add_argument("--json", action="store_true", help="one JSON object: hardware, layouts (all, fastest first)")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is null: give model.vocab_size=N to size the model")
        hw = hardware_from_args(args)
        rows = plan(cfg, hw)
        needed = None if rows else smallest_fitting_gpus(cfg, hw)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"hardware": dataclasses.asdict(hw), "layouts": rows, "smallest_fitting_gpus": needed}))
    elif rows:
        print(format_plan(rows, hw, args.top))
    else:
        print(f"no layout fits on {hw.gpus} GPUs of {hw.gpu_memory / 2 ** 30:.0f} GiB; "
              + (f"the smallest GPU count with one that fits: {needed}" if needed else
                 f"none fits up to {64 * hw.gpus} GPUs either"))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
