"""DeepSpeed (ZeRO-1, gradient clipping) on TP and EP models: one optimizer step equals the single-process step.

Checks what only the engine does: the global gradient norm over TP shards and EP expert shards (clipping is
active), dense gradients averaged over the data-parallel group, expert gradients over the expert-data-parallel
group only (dp4 ep2: two ranks per expert shard).
"""
import copy

import torch
import torch.distributed as dist

from helpers import run_distributed
from parallel import Topology, initialize_parallel, parallelize_model
from pretrain.config import load_config
from pretrain.model import build_model

# eps = 1 makes Adam's first step ~ lr * g (for |g| << 1): sensitive to the gradients' values, not only to their
# signs, and not flipped by rounding noise in near-zero gradients as with eps = 1e-8.
LR, EPS, CLIP = 1.0, 1.0, 0.5


def _reference_step(ref, batches):
    """Single process: mean loss over all data-parallel ranks' batches, clip, AdamW. Returns the grad norm."""
    loss = sum(_loss(ref(ids, labels=ids)) for ids in batches) / len(batches)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
    torch.optim.AdamW(ref.parameters(), lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.0).step()
    return norm


def _loss(out):
    return out.lm_loss + 0.3 * out.mtp_losses[0]


def _engine_step(rank, world, overrides):
    import deepspeed

    cfg = load_config("tiny", overrides + ["train.global_batch_size=4", "train.micro_batch_size=1"])
    topo = Topology.from_config(cfg, world, rank=rank)
    initialize_parallel(topo)
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    model = parallelize_model(copy.deepcopy(ref), topo, cfg)
    # Each data-parallel rank gets its own batch, the same for all TP ranks of that data-parallel rank.
    batches = [torch.randint(0, cfg.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(d))
               for d in range(topo.dp)]
    accumulation = 4 // topo.dp
    want_norm = _reference_step(ref, [b for b in batches for _ in range(accumulation)])

    ds_config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 1,
                 "gradient_accumulation_steps": accumulation, "gradient_clipping": CLIP,
                 "zero_optimization": {"stage": 1},
                 "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": EPS,
                                                           "weight_decay": 0.0, "torch_adam": True}}}
    # DeepSpeed's MoE support needs named parameter groups to split expert parameters into their own group.
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=topo.deepspeed_mpu(),
                                      model_parameters=[{"params": list(model.parameters()), "name": "all"}])
    assert engine.has_moe_layers == (topo.ep > 1)
    for _ in range(accumulation):
        engine.backward(_loss(engine(batches[topo.dp_rank], labels=batches[topo.dp_rank])))
        engine.step()
    assert want_norm > CLIP  # clipping is active, so the norm must be right for the step to match
    torch.testing.assert_close(torch.tensor(float(engine.get_global_grad_norm())), want_norm, rtol=1e-5, atol=0)
    _check_params_equal_reference(model, ref, topo)


def _check_params_equal_reference(model, ref, topo):
    from parallel.expert import ExpertParallelExperts

    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].detach()
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, ExpertParallelExperts):
            want = want[owner.first_expert:owner.first_expert + owner.num_experts]
        elif getattr(p, "tensor_model_parallel", False):
            want = want.chunk(topo.tp, dim=p.partition_dim)[topo.tp_rank]
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6, msg=name)
    dist.barrier()


def test_tp2_engine_step_equals_single_process():
    run_distributed(_engine_step, 2, ["parallel.tp=2"])


def test_dp4_ep2_engine_step_equals_single_process():
    run_distributed(_engine_step, 4, ["parallel.ep=2"])
