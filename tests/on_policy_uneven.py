"""Generation under FSDP2 on 2 processes whose rows end at different lengths (``test_on_policy_launcher.py``):
rank 0's sampler forces EOS at once, rank 1's never takes it. Each rank writes its continuation lengths to
``OUT.rank{R}``. Run with ``FSDP_VERSION=2 composer -n 2 tests/on_policy_uneven.py TINY_ASSETS OUT``."""

import json
import sys

import torch
from composer import Trainer
from composer.utils import dist, get_device
from transformers import AutoModelForCausalLM

from composer_kd import DistillationModel
from composer_kd.data.rollout_batches import continuation_lengths
from composer_kd.model.generation import generate_continuations
from composer_kd.model.sampling import SeededGumbelSampler, row_keys

EOS = 0


class _Steered(SeededGumbelSampler):
    """Takes EOS at once (``end``) or never."""

    def __init__(self, *args: object, end: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.end = end

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, EOS] = 1e4 if self.end else -1e4
        return super().__call__(input_ids, scores)


def main(assets: str, out: str) -> None:
    dist.initialize_dist(get_device('cpu'))
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(f'{assets}/student')
    model = DistillationModel(student, None, alpha=1.0)
    trainer = Trainer(model=model, optimizers=torch.optim.SGD(student.parameters(), lr=0.1), device='cpu',
                      precision='fp32', parallelism_config={'fsdp': {'sharding_strategy': 'FULL_SHARD'}},
                      progress_bar=False, log_to_console=False, seed=0)
    rank = dist.get_global_rank()
    prompts = torch.randint(1, 100, (4, 6), generator=torch.Generator().manual_seed(rank))
    sampler = _Steered(row_keys(17, 0, torch.arange(4) + 4 * rank), 6, end=rank == 0)
    wrapped = trainer.state.model.model
    tokens, _ = generate_continuations(wrapped, prompts, torch.ones_like(prompts), sampler, 12, [EOS], EOS,
                                       world_size=dist.get_world_size())
    lengths, _ = continuation_lengths(tokens, [EOS])
    with open(f'{out}.rank{rank}', 'w') as f:
        json.dump(lengths.tolist(), f)
    dist.barrier()


if __name__ == '__main__':
    main(*sys.argv[1:3])
