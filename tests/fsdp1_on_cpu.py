"""Composer's FSDP1 path on CPU processes (gloo), for tests of the GPU-only code that wraps our models.

torch 2.7's FSDP1 itself runs on CPU (``device_id=cpu``); Composer 0.32.1 reaches it only through three
CUDA-only calls, which this module redirects to the CPU while active — nothing else changes:

* ``torch.cuda.current_device()`` (Composer's ``device_id`` and meta-init target) → ``torch.device('cpu')``;
* ``Module.to_empty(device='cuda:…')`` (Composer's ``_param_init_fn``) → the CPU;
* FSDP1's check that ``sync_module_states`` tensors are on a GPU (NCCL broadcasts need them there; gloo does not).

So Composer's own ``prepare_fsdp_module`` — its ``param_init_fn`` lookup, auto-wrap policy, mixed precision and
``sync_module_states`` broadcast — runs as it would on an 8-GPU node.

Run as a script, it trains the model sections of one of our recipes at toy size under FSDP1 with
``init_device: mixed`` (``composer -n 2 tests/fsdp1_on_cpu.py OUT RECIPE MODEL_DIR``); see
``tests/test_gpu_paths.py``.
"""

import contextlib
import json
import sys
from typing import Any, Iterator
from unittest import mock

import torch

__all__ = ['fsdp1_on_cpu']


@contextlib.contextmanager
def fsdp1_on_cpu() -> Iterator[None]:
    """While active, Composer's FSDP1 wrapping runs on CPU processes (see the module)."""
    to_empty = torch.nn.Module.to_empty

    def to_empty_on_cpu(self: torch.nn.Module, *, device: Any, recurse: bool = True) -> torch.nn.Module:
        del device
        return to_empty(self, device='cpu', recurse=recurse)

    with mock.patch('torch.cuda.current_device', lambda: torch.device('cpu')), \
            mock.patch.object(torch.nn.Module, 'to_empty', to_empty_on_cpu), \
            mock.patch('torch.distributed.fsdp._init_utils._check_module_states_for_sync_module_states',
                       lambda states: None):
        yield


def _max_difference(wrapped: torch.nn.Module, expected: dict[str, torch.Tensor]) -> float:
    """Largest difference between the gathered weights of an FSDP1 root and ``expected`` (name -> tensor)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        found = {clean_tensor_name(n): p.detach().clone() for n, p in wrapped.named_parameters()}
    assert sorted(found) == sorted(expected), (sorted(found), sorted(expected))
    return max(float((found[n].float() - p.float()).abs().max()) for n, p in expected.items())


def _train_recipe_sections(out: str, recipe: str, model_dir: str) -> None:
    """Two FSDP1 steps of ``recipe``'s model sections, each pointed at ``model_dir`` (a tiny Llama) with every other
    key as the recipe has it (``init_device: mixed``, ``torch_dtype``, ...), under its ``fsdp_config`` with the bf16
    parameters and buffers its ``mixed_precision: PURE`` means under ``amp_bf16`` (Composer refuses amp on CPU, so
    the dtypes are given explicitly). Each rank writes ``out.rank{R}`` (JSON): how far its gathered student and
    teacher weights are from ``model_dir``'s once wrapped (rank 1 built them on meta), the RoPE buffer dtypes seen
    inside every forward, and the losses of the two steps."""
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.utils import dist, get_device
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from composer_kd import DistillationModel, token_data_spec
    from composer_kd.data.tokens import collate_tokens
    from composer_kd.config.run_rules import model_entries
    from composer_kd.builders.models import build_causal_lm
    from composer_kd.config.model_schema import fsdp_settings

    dist.initialize_dist(get_device('cpu'))
    cfg = OmegaConf.to_container(OmegaConf.load(recipe), resolve=True)
    sections = {key: {**section, 'pretrained_model_name_or_path': model_dir}
                for key, section in model_entries(cfg['model'])}
    torch.manual_seed(0)
    models = {key: build_causal_lm(key, section) for key, section in sections.items()}
    student = models.pop('model.student', None)
    if student is None:  # a precompute recipe: the teacher alone, and a student to give the Trainer a loss
        student = build_causal_lm('model.student', {'pretrained_model_name_or_path': model_dir})
    distillation = {k: v for k, v in (cfg['model'].get('distillation') or {}).items() if k != 'fused_head'}
    model = DistillationModel(student, list(models.values()), **distillation)
    rope_dtypes: list[str] = []
    for rotary in [m for m in model.modules() if 'inv_freq' in m._buffers]:
        rotary.register_forward_pre_hook(lambda m, a: rope_dtypes.append(str(m.inv_freq.dtype)))
    g = torch.Generator().manual_seed(0)
    samples = [{'input_ids': torch.randint(0, 64, (12,), generator=g)} for _ in range(8)]
    loader = DataLoader(samples, batch_size=4, collate_fn=collate_tokens, sampler=dist.get_sampler(samples))
    fsdp = fsdp_settings(cfg['fsdp_config'], list(sections.values()))
    fsdp['mixed_precision'] = {'param_dtype': 'bf16', 'reduce_dtype': 'bf16', 'buffer_dtype': 'bf16'}
    logger = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=token_data_spec(loader),
                      optimizers=torch.optim.SGD(model.model.parameters(), lr=0.1), max_duration='2ba',
                      device='cpu', precision='fp32', device_train_microbatch_size=2, loggers=[logger],
                      parallelism_config={'fsdp': fsdp}, progress_bar=False, log_to_console=False, seed=0)
    wrapped = trainer.state.model

    def loaded(section: dict[str, Any]) -> dict[str, torch.Tensor]:
        dtype = getattr(torch, section.get('torch_dtype', 'float32'))
        return dict(AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).named_parameters())

    teachers = [section for key, section in sections.items() if key != 'model.student']
    expected = {f'members.{i}.{n}': p for i, section in enumerate(teachers) for n, p in loaded(section).items()}
    result = {'student': _max_difference(wrapped.model, loaded(sections.get('model.student', {}))),
              'teachers': _max_difference(wrapped.teachers, expected)}
    trainer.fit()
    result['rope_dtypes'] = sorted(set(rope_dtypes))
    result['losses'] = [float(v) for _, v in logger.data['loss/train/total']]
    with open(f'{out}.rank{dist.get_global_rank()}', 'w') as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == '__main__':
    with fsdp1_on_cpu():
        _train_recipe_sections(*sys.argv[1:4])
    print(json.dumps({'ok': True}))
