"""``hf_checkpointer``: the student as a ``save_pretrained`` folder with its tokenizer every interval and at the end,
in the precision asked for, to a folder or an object store (Apache Libcloud's local provider here); under FSDP2
on 2 processes in ``test_foundry_model.py`` (gathered on rank 0, equal to the exported checkpoint)."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_kd.config.run_config import load_config
from composer_kd.run.train import train

RECIPE = str(Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu.yaml')


def _run(tiny_assets: Path, hf: dict) -> tuple[dict, dict]:
    cfg = load_config(RECIPE, [f'variables.assets={tiny_assets}', 'max_duration=5ba', 'eval_loader=null',
                               'save_folder=null', 'progress_bar=false'])
    cfg['callbacks'] = {'hf_checkpointer': hf}
    trainer = train(cfg)
    final = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items()}
    trainer.close()
    return final, cfg


def test_student_folders_every_interval_and_at_the_end(tmp_path: Path, tiny_assets: Path) -> None:
    final, _ = _run(tiny_assets, {'save_folder': str(tmp_path / 'runs' / '{run_name}'), 'save_interval': '2ba',
                                  'precision': 'bfloat16'})
    folders = sorted(p.name for p in (tmp_path / 'runs').glob('*/huggingface/*'))
    assert folders == ['ba2', 'ba4', 'ba5'], folders  # every 2 batches, and the last one
    last = next((tmp_path / 'runs').glob('*/huggingface/ba5'))
    model = AutoModelForCausalLM.from_pretrained(last, torch_dtype='auto')
    assert model.dtype == torch.bfloat16
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, final[name].to(torch.bfloat16)), name
    tokenizer = AutoTokenizer.from_pretrained(last)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer').get_vocab()


def test_student_folders_go_to_an_object_store(tmp_path: Path, tiny_assets: Path) -> None:
    (tmp_path / 'store' / 'bucket').mkdir(parents=True)
    final, _ = _run(tiny_assets, {'save_folder': 'libcloud://bucket/runs/{run_name}', 'save_interval': '10ba',
                                  'backend_kwargs': {'provider': 'local', 'container': 'bucket',
                                                     'provider_kwargs': {'key': str(tmp_path / 'store')}}})
    uploaded = list((tmp_path / 'store' / 'bucket' / 'runs').glob('*/huggingface/ba5'))
    assert len(uploaded) == 1 and (uploaded[0] / 'model.safetensors').is_file()
    model = AutoModelForCausalLM.from_pretrained(uploaded[0])
    assert all(torch.equal(w, final[n]) for n, w in model.state_dict().items())
