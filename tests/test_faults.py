"""Bad data and numeric faults: each a one-line message naming the file, sample, step or rank, the right exit
status, and nothing lost (no NaN written into the student, nothing half-trained saved as good)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability import record
from streaming import MDSWriter
from streaming.base.compression import decompress
from transformers import AutoModelForCausalLM

from composer_kd.cli import main


def _run_cli(*args: str) -> tuple[int, str]:
    """``python -m composer_kd ARGS`` in a fresh process: exit status and the last line of stderr."""
    proc = subprocess.run([sys.executable, '-m', 'composer_kd', *args], capture_output=True, text=True, timeout=240)
    lines = proc.stderr.strip().splitlines()
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, lines[-1] if lines else ''


def _fails_at_data(capsys, config: Path, fault: str, match: str, *overrides: str) -> None:
    """Refused in one line naming the loader and the file (bad index or shard: checked when the loader is built)."""
    assert main(['train', str(config), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert err[0].startswith('composer-kd train: error: train_loader: '), err
    assert not (config.parent / 'runs').exists()  # refused before the Trainer: nothing written
    record(fault, err[0])


def _index(data: Path, split: str = 'train') -> dict:
    return json.loads((data / split / 'index.json').read_text())


def test_missing_shard(capsys, tmp_path, write_config) -> None:
    config = write_config()
    for f in (tmp_path / 'data' / 'train').glob('shard.00000.mds*'):
        f.unlink()
    _fails_at_data(capsys, config, 'MDS shard missing', 'shard.00000.mds: shard listed in index.json is missing')


def test_index_lists_a_shard_that_is_not_there(capsys, tmp_path, write_config) -> None:
    config = write_config()
    index = _index(tmp_path / 'data')
    extra = json.loads(json.dumps(index['shards'][0]))
    extra['raw_data']['basename'], extra['zip_data']['basename'] = 'shard.00001.mds', 'shard.00001.mds.zstd'
    index['shards'].append(extra)
    (tmp_path / 'data' / 'train' / 'index.json').write_text(json.dumps(index))
    _fails_at_data(capsys, config, 'index.json lists a shard that is not there',
                   'shard.00001.mds: shard listed in index.json is missing')


def test_truncated_shard(capsys, tmp_path, write_config) -> None:
    config = write_config()
    (tmp_path / 'data' / 'train' / 'shard.00000.mds').unlink(missing_ok=True)  # Streaming's decompressed copy
    shard = tmp_path / 'data' / 'train' / 'shard.00000.mds.zstd'
    size = shard.stat().st_size
    assert size == _index(tmp_path / 'data')['shards'][0]['zip_data']['bytes']
    shard.write_bytes(shard.read_bytes()[:size // 2])
    _fails_at_data(capsys, config, 'MDS shard truncated', f'shard.00000.mds.zstd: shard is {size // 2} bytes, '
                   f'index.json says {size} (truncated or overwritten)')


def test_unreadable_index(capsys, tmp_path, write_config) -> None:
    config = write_config()
    (tmp_path / 'data' / 'train' / 'index.json').write_text('{"shards": [')
    _fails_at_data(capsys, config, 'index.json not valid JSON', 'index.json: not a readable MDS index (JSONDecodeError')


def test_empty_split(capsys, tmp_path, write_config) -> None:
    config = write_config()
    index = _index(tmp_path / 'data')
    index['shards'] = []
    (tmp_path / 'data' / 'train' / 'index.json').write_text(json.dumps(index))
    _fails_at_data(capsys, config, 'empty split', 'the split is empty (index.json lists 0 shards and no samples)')


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
def test_corrupt_shard_bytes(tmp_path, write_config, workers) -> None:
    # Same size, garbage in the sample region: named at the first bad read, in the main process or a worker.
    config = write_config(**{'train_loader.num_workers': workers, 'eval_loader': None, 'max_duration': '2ba',
                             'train_loader.dataset.shuffle': False})
    folder = tmp_path / 'data' / 'train'
    shard = folder / 'shard.00000.mds'  # the decompressed shard Streaming reads (it decompresses once, in place)
    data = bytearray(decompress('zstd', (folder / 'shard.00000.mds.zstd').read_bytes()))
    data[20_000:200_000] = np.random.default_rng(0).integers(0, 256, 180_000, dtype=np.uint8).tobytes()
    shard.write_bytes(bytes(data))
    status, line = _run_cli('train', str(config))
    assert status == 2, line
    assert line.startswith('composer-kd train: error: ') and '/data/train: sample ' in line, line
    assert 'outside the tokenizer' in line or 'cannot be read' in line or 'tokens, more than' in line, line
    assert not list((tmp_path / 'runs').rglob('*.pt'))
    if workers:
        record('corrupt shard bytes (read in a DataLoader worker)', line)
    else:
        record('corrupt shard bytes', line)


@pytest.mark.slow
def test_corrupt_compressed_shard(tmp_path, write_config) -> None:
    # Streaming decompresses in a background thread; its failure is named by shard, not a thread's traceback.
    config = write_config(**{'eval_loader': None, 'max_duration': '2ba'})
    folder = tmp_path / 'data' / 'train'
    (folder / 'shard.00000.mds').unlink(missing_ok=True)
    shard = folder / 'shard.00000.mds.zstd'
    data = bytearray(shard.read_bytes())
    data[1_000:50_000] = bytes(49_000)
    shard.write_bytes(bytes(data))
    status, line = _run_cli('train', str(config))
    assert status == 2 and 'shard.00000.mds.zstd: shard cannot be prepared (' in line, line
    assert 'is it corrupt?' in line
    record('corrupt compressed shard (decompressed by Streaming in a background thread)', line)


def _write_tokens(folder: Path, rows: list[np.ndarray]) -> None:
    with MDSWriter(columns={'tokens': 'ndarray:int32'}, out=str(folder)) as writer:
        for row in rows:
            writer.write({'tokens': row.astype(np.int32)})


@pytest.mark.slow
def test_sample_longer_than_max_seq_len(tmp_path, write_config) -> None:
    config = write_config(**{'max_seq_len': 64, 'train_loader.dataset.max_seq_len': 64, 'eval_loader': None})
    status, line = _run_cli('train', str(config))
    assert status == 2 and 'sample ' in line and 'has 128 tokens, more than max_seq_len=64' in line, line
    record('sample longer than max_seq_len', line)


@pytest.mark.slow
def test_token_ids_outside_the_vocabulary(tmp_path, write_config) -> None:
    config = write_config(**{'eval_loader': None})
    shutil.rmtree(tmp_path / 'data' / 'train')
    rows = [np.arange(128) for _ in range(16)]
    rows[3] = np.full(128, 10_000)  # the tiny tokenizer has 1,024 ids
    _write_tokens(tmp_path / 'data' / 'train', rows)
    status, line = _run_cli('train', str(config), 'train_loader.dataset.shuffle=false')
    assert status == 2 and 'sample 3 holds token id 10000, outside the tokenizer' in line, line
    record('token ids outside the vocabulary', line)


def _nan_teacher(tiny_assets: Path, folder: Path, token: int) -> Path:
    """The tiny teacher with NaN in one token's embedding row: its logits are NaN wherever that token is seen."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets / 'teacher')
    teacher.config.tie_word_embeddings = False  # else the head's row turns NaN too, and every position with it
    head = teacher.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with torch.no_grad():
        teacher.get_input_embeddings().weight[token] = float('nan')
    teacher.save_pretrained(folder)
    return folder


def _rare_token(data: Path) -> int:
    """A token in some but not most training samples, so some batches are hit and some are not."""
    from streaming import StreamingDataset
    dataset = StreamingDataset(local=str(data), split='train', shuffle=False, batch_size=1)
    seen = np.zeros(100_000, dtype=np.int64)
    for i in range(64):
        seen[np.unique(dataset[i]['tokens'])] += 1
    seen[:8] = 0  # not a special token: the pad token fills short samples everywhere
    return int(np.flatnonzero((seen >= 1) & (seen <= 2))[0])


@pytest.mark.slow
def test_nonfinite_teacher_stops_naming_step_rank_and_samples(tmp_path, tiny_assets, write_config) -> None:
    config = write_config(**{'eval_loader': None, 'max_duration': '8ba', 'save_interval': '1ba',
                             'save_num_checkpoints_to_keep': -1, 'train_loader.dataset.shuffle': False})
    token = _rare_token(tmp_path / 'data')
    teacher = _nan_teacher(tiny_assets, tmp_path / 'nan-teacher', token)
    status, line = _run_cli('train', str(config), f'model.teacher.pretrained_model_name_or_path={teacher}')
    assert status == 1, line
    assert line.startswith('composer-kd train: stopped: non-finite loss at step ') and 'rank 0, sample ids [' in line
    assert "(the distillation term: check the teacher's outputs)" in line and 'nothing was applied' in line, line
    step = int(line.split('at step ')[1].split(':')[0])
    ids = [int(i) for i in line.split('sample ids [')[1].split(']')[0].split(', ')]
    from streaming import StreamingDataset
    dataset = StreamingDataset(local=str(tmp_path / 'data'), split='train', shuffle=False, batch_size=1)
    assert any(token in dataset[i]["tokens"] for i in ids), (line, token)  # the samples named hold it
    checkpoints = sorted((tmp_path / 'runs').rglob('ep*-ba*-rank0.pt'))
    assert len(checkpoints) == step - 1  # every step before the fault saved; nothing after
    for checkpoint in checkpoints:
        weights = torch.load(checkpoint, weights_only=False)['state']['model']
        assert all(torch.isfinite(w).all() for w in weights.values())
    record('NaN in the teacher\'s logits (default: stop)', line, lost='nothing: the bad step was not applied')


@pytest.mark.slow
def test_nonfinite_batches_are_skipped_on_request(tmp_path, tiny_assets, write_config) -> None:
    config = write_config(**{'eval_loader': None, 'max_duration': '8ba', 'save_interval': '8ba',
                             'train_loader.dataset.shuffle': False, 'on_nonfinite': 'skip_batch',
                             'loggers': {'csv': {'filename': str(tmp_path / 'metrics.csv')}}})
    teacher = _nan_teacher(tiny_assets, tmp_path / 'nan-teacher', _rare_token(tmp_path / 'data'))
    status, line = _run_cli('train', str(config), f'model.teacher.pretrained_model_name_or_path={teacher}')
    assert status == 0, line
    weights = torch.load(next((tmp_path / 'runs').rglob('ep*-ba8-rank0.pt')), weights_only=False)['state']
    assert all(torch.isfinite(w).all() for w in weights['model'].values())
    skipped = weights['callbacks']['NonFiniteGuard']['skipped']
    assert 0 < skipped < 8
    rows = [r for r in (tmp_path / 'metrics.csv').read_text().splitlines() if 'nonfinite/skipped_batches' in r]
    assert rows and rows[-1].endswith(f',{skipped}') or rows[-1].endswith(f',{float(skipped)}'), rows[-1:]
    record('NaN in the teacher\'s logits with on_nonfinite: skip_batch', f'exit 0; {skipped} of 8 batches skipped, '
           'counted in nonfinite/skipped_batches', lost=f'the {skipped} skipped batches (by request)')


def test_a_failed_fit_turns_garbage_collection_back_on(capsys, tmp_path, tiny_assets, write_config) -> None:
    """scheduled_gc disables GC for fit; Composer runs no event when fit raises, so a notebook would keep GC off."""
    import gc
    config = write_config(**{'eval_loader': None, 'max_duration': '8ba', 'save_interval': '8ba',
                             'train_loader.dataset.shuffle': False, 'callbacks': {'scheduled_gc': {}}})
    teacher = _nan_teacher(tiny_assets, tmp_path / 'nan-teacher', _rare_token(tmp_path / 'data'))
    assert gc.isenabled()
    assert main(['train', str(config), f'model.teacher.pretrained_model_name_or_path={teacher}']) == 1
    assert 'non-finite loss at step' in capsys.readouterr().err
    assert gc.isenabled()
