"""Per-sample tracking: sample ids through loader and microbatches, per-sample values that add up to the batch
loss, every sample of an epoch once across an autoresume, the hardest-samples report with source documents."""

import csv
from pathlib import Path

import pytest
import torch
from helpers import tiny_gpt2
from streaming import StreamingDataset

from composer_kd import distillation_loss
from composer_kd.cli import main
from composer_kd.data.tokens import collate_tokens
from composer_kd.losses.stats import per_sample_losses
from composer_kd.config.run_config import load_config
from composer_kd.run.train import train

# The val split (390 samples) as one epoch of 39 batches of 10 in microbatches of 5.
EPOCH = {'train_loader.dataset.split': 'val', 'global_train_batch_size': 10, 'device_train_microbatch_size': 5,
         'eval_loader': None, 'save_interval': '10ba', 'autoresume': True}


def test_per_sample_values_add_up_to_the_batch_terms() -> None:
    g = torch.Generator().manual_seed(2)
    batch = collate_tokens([{'input_ids': torch.randint(0, 48, (n,), generator=g)} for n in (9, 3, 6)])
    student = tiny_gpt2(seed=1)(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
    teacher = tiny_gpt2(seed=2, n_layer=2)(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
    settings = {'temperature': 2.0, 'divergence': 'jsd', 'beta': 0.3}
    each = per_sample_losses(student, teacher, batch['labels'], **settings)
    whole = distillation_loss(student, teacher, batch['labels'], alpha=0.5, **settings)
    assert each['tokens'].tolist() == [8, 2, 5]
    for name in ('ce', 'kd'):
        weighted = (each[name] * each['tokens']).sum() / each['tokens'].sum()
        assert weighted.item() == pytest.approx(whole[name].item(), rel=1e-5), name
    assert ((each['top1_agreement'] >= 0) & (each['top1_agreement'] <= 1)).all()


def test_prepare_data_records_each_samples_source_document(tiny_assets: Path) -> None:
    dataset = StreamingDataset(local=str(tiny_assets / 'data'), split='val', shuffle=False, batch_size=1)
    sources = {dataset[i]['source'] for i in range(dataset.num_samples)}
    assert len(sources) > 1 and all(name.endswith('.py') for name in sources)


@pytest.mark.slow
def test_every_sample_of_an_epoch_once_across_an_autoresume(capsys, tmp_path: Path, write_config) -> None:
    folder = tmp_path / 'samples'
    config = write_config(max_duration='20ba', callbacks={'per_sample_log': {'folder': str(folder)}}, **EPOCH)
    train(load_config(str(config))).close()
    rows = list(csv.DictReader((folder / 'samples-rank0.csv').open()))
    assert sorted({int(r['step']) for r in rows}) == list(range(20))
    train(load_config(str(config), ['max_duration=1ep'])).close()  # resumes at batch 20
    rows = list(csv.DictReader((folder / 'samples.csv').open()))
    assert sorted(int(r['sample_id']) for r in rows) == list(range(390))  # each exactly once
    assert sorted({int(r['step']) for r in rows}) == list(range(39))
    assert all(float(r['kd']) >= 0 for r in rows)
    assert sum(r['tokens'] != '127' for r in rows) == 1  # 128-token samples; the split's last one is shorter

    capsys.readouterr()
    assert main(['samples', str(folder), '--hardest', '5']) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + 5 and table[2].startswith('| 1 | ')
    kds = [float(line.split('|')[5]) for line in table[2:]]
    assert kds == sorted(kds, reverse=True) and all(line.rstrip(' |').endswith('.py') for line in table[2:])
    assert main(['samples', str(tmp_path / 'nowhere')]) == 2
