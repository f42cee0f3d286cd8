"""Model FLOPs for ``speed_monitor``: the weights that enter matrix products, counted layer by layer here, and the
step's total (student forward + backward, each teacher's forward, nothing for a precomputed teacher)."""

from pathlib import Path

import pytest
import torch
from composer.loggers import InMemoryLogger
from helpers import tiny_gpt2
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd import DistillationModel
from composer_kd.model.flops import forward_flops, matmul_params
from composer_kd.config.run_config import load_config
from composer_kd.run.train import train


def _gpt2_matmul_weights(config: GPT2Config, tied: bool) -> int:
    """GPT-2's matrices and biases by hand: per block QKV, attention out, MLP in and out, two LayerNorms; a final
    LayerNorm; the LM head (V×H). Lookups (positions; tokens unless tied to the head) are not products."""
    h, layers, v = config.n_embd, config.n_layer, config.vocab_size
    block = (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h) + 2 * (2 * h)
    return layers * block + 2 * h + v * h


@pytest.mark.parametrize('tied', [True, False])
def test_matmul_params_leave_out_lookup_tables(tied: bool) -> None:
    config = GPT2Config(vocab_size=50, n_layer=2, n_embd=16, n_head=2, n_positions=32, tie_word_embeddings=tied)
    model = GPT2LMHeadModel(config)
    assert matmul_params(model) == _gpt2_matmul_weights(config, tied)


def test_a_step_costs_three_student_forwards_and_one_per_teacher() -> None:
    student, teacher = tiny_gpt2(), tiny_gpt2(n_layer=2, n_embd=32)
    batch = {'input_ids': torch.zeros(4, 24, dtype=torch.long)}

    def forward(model: GPT2LMHeadModel) -> int:  # the formula written out: 2·N per token + attention's T×T products
        return 4 * 24 * 2 * matmul_params(model) + 4 * 24 * 4 * model.config.n_layer * model.config.n_embd * 24

    assert forward(student) == forward_flops(matmul_params(student), 1, 16, 4, 24)
    online = DistillationModel(student, teacher, alpha=0.5)
    assert online.flops_per_batch(batch) == 3 * forward(student) + forward(teacher)
    ensemble = DistillationModel(student, [teacher, tiny_gpt2(n_layer=2, n_embd=32, seed=3)], alpha=0.5)
    assert ensemble.flops_per_batch(batch) == 3 * forward(student) + 2 * forward(teacher)
    offline = DistillationModel(student, None, alpha=0.5, precomputed_teacher=True)
    assert offline.flops_per_batch(batch) == 3 * forward(student)


def test_speed_monitor_reports_flops(tiny_assets: Path, tmp_path: Path) -> None:
    recipe = str(Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu.yaml')
    cfg = load_config(recipe, [f'variables.assets={tiny_assets}', 'max_duration=3ba', 'eval_loader=null',
                               'save_folder=null', 'callbacks={speed_monitor: {window_size: 1}}',
                               'loggers={inmemory: {}}'])
    trainer = train(cfg)
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    flops = [v for _, v in memory.data['throughput/device/flops_per_sec']]
    trainer.close()
    assert flops and all(v > 0 for v in flops)
