"""GRPO / PPO with FIXED rollouts, for the layout-parity tests: ``python tests/grpo_fixed.py grpo|ppo`` then
``posttrain.grpo``'s command line; each output is a function of its prompt and its place in the group only (not of the layout, the
rank or the weights), so every layout trains on the same rollouts. Also the tests' reward ``grpo_fixed:digit_share``
(import with tests/ on PYTHONPATH)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain.rl.ppo import PPOObjective  # noqa: E402
from posttrain.rl.trainer import GRPOObjective  # noqa: E402
from posttrain.stage import exit_after, run_stage  # noqa: E402


def digit_share(prompt, completion: str, sample: dict) -> float:
    """The share of digits in the completion: varies between samples of an untrained model."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def digits_if_odd(prompt, completion: str, sample: dict) -> float:
    """``digit_share`` for prompts with an odd answer, 0 for the others (their groups are uniform)."""
    return digit_share(prompt, completion, sample) if int(sample["answer"]) % 2 else 0.0


def broken(prompt, completion: str, sample: dict) -> float:
    return 1 / 0


class FixedSamples:
    def sample(self, prompts, seed):
        outputs, G = [], self.cfg.rl.group_size
        for i, ids in enumerate(prompts):
            rng = random.Random(sum(ids) * 1009 + len(ids) * 31 + i % G)
            n = rng.randint(1, self.cfg.rl.max_new_tokens)
            out = [rng.randrange(3, self.tok.vocab_size - 3) for _ in range(n)]
            if n < self.cfg.rl.max_new_tokens and rng.random() < 0.5:
                out.append(self.tok.end_of_turn_id)
            outputs.append(out)
        return outputs, None


class FixedGRPO(FixedSamples, GRPOObjective):
    pass


class FixedPPO(FixedSamples, PPOObjective):
    pass


if __name__ == "__main__":
    exit_after(run_stage({"grpo": FixedGRPO, "ppo": FixedPPO}[sys.argv[1]](), sys.argv[2:]))
