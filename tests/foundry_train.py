"""Run with LLM Foundry's interpreter by ``tests/test_foundry_plugin.py`` (composer-kd is installed beside Foundry
there): Foundry's own ``train`` on a YAML — what ``llmfoundry.command_utils.train_from_yaml`` does —, then a JSON
report of what Foundry did around the model.

    python tests/foundry_train.py CONFIG.yaml REPORT.json [key=value ...]
"""

import json
import sys
from typing import Any

from llmfoundry.command_utils import train
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM


def report(trainer: Any, cfg: Any) -> dict[str, Any]:
    """What the test checks: the batch reached, the parameter count Foundry logs, the teacher against its files on
    disk (in the dtype Foundry gave the model), and which parameters the optimizer keeps state for."""
    model = trainer.state.model
    student = sum(p.numel() for p in model.model.parameters())
    out: dict[str, Any] = {'batch': int(trainer.state.timestamp.batch), 'n_total_params': model.n_total_params,
                           'n_active_params': model.n_active_params, 'student_params': student,
                           'model_class': type(model).__name__,
                           'dtypes': sorted({str(p.dtype) for p in model.parameters()})}
    optimizer = trainer.state.optimizers[0]
    stated = {id(p) for p in optimizer.state}
    out['optimizer_state_entries'] = len(stated)
    out['student_tensors'] = len(list(model.model.parameters()))
    teacher_cfg = cfg.model.get('teacher') or {}
    if model.teachers is not None:
        teacher = list(model.teachers.parameters())
        out['teacher_tensors_with_optimizer_state'] = sum(id(p) in stated for p in teacher)
        out['teacher_requires_grad'] = any(p.requires_grad for p in teacher)
        on_disk = AutoModelForCausalLM.from_pretrained(teacher_cfg['pretrained_model_name_or_path']).state_dict()
        trained = model.teachers.members[0].state_dict()
        out['teacher_max_abs_change'] = max(
            (trained[k] - v.to(trained[k].dtype)).abs().max().item() for k, v in on_disk.items() if k in trained)
        out['teacher_tensors_compared'] = sum(k in trained for k in on_disk)
    return out


def main(argv: list[str]) -> None:
    yaml_path, report_path, *overrides = argv
    cfg = OmegaConf.merge(OmegaConf.load(yaml_path), OmegaConf.from_dotlist(overrides))
    OmegaConf.resolve(cfg)
    trainer = train(cfg)
    with open(report_path, 'w') as f:
        json.dump(report(trainer, cfg), f, indent=1)
    trainer.close()


if __name__ == '__main__':
    main(sys.argv[1:])
