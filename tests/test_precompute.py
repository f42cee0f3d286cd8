"""``composer-kd precompute-teacher`` on the tiny assets: what it writes (against the teacher run directly), both
encodings, a complete rerun that writes nothing, a SIGKILLed run finished by the same command, bad inputs."""

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from helpers import assert_cli_error, assert_parts_kept, kill_after_parts
from omegaconf import OmegaConf
from reliability import record
from streaming import MDSWriter, StreamingDataset
from transformers import AutoModelForCausalLM

from composer_kd.cli import main
from composer_kd.data import topk_parts
from composer_kd.data.teacher_topk import decode_teacher, pad_teacher, topk_teacher_from_batch
from composer_kd.run import precompute_record
from composer_kd.config.precompute_config import load_precompute_config
from composer_kd.config.run_config import load_config
from composer_kd.config.precompute_config import check_precompute_config
from composer_kd.run.train import train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / 'yamls' / 'tiny-cpu-precompute.yaml'


@pytest.fixture
def precompute_config(tmp_path: Path, tiny_assets: Path) -> Callable[..., Path]:
    """``yamls/tiny-cpu-precompute.yaml`` on the tiny val split (390 samples), written to ``tmp_path/out``."""

    def write(**edits: object) -> Path:
        cfg = OmegaConf.load(RECIPE)
        cfg.variables.assets = str(tiny_assets)
        cfg.precompute.dataset.split = 'val'
        cfg.precompute.out.local = str(tmp_path / 'out')
        cfg.precompute.progress_bar = False
        for key, value in edits.items():
            OmegaConf.update(cfg, key, value, force_add=True)
        path = tmp_path / f'precompute-{len(list(tmp_path.glob("precompute-*.yaml")))}.yaml'
        OmegaConf.save(cfg, path)
        return path

    return write


def _samples(split_dir: Path) -> list[dict]:
    dataset = StreamingDataset(local=str(split_dir), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(dataset.num_samples)]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob('*')}


@pytest.mark.slow
@pytest.mark.parametrize('encoding', ['float16', 'uint8'])
def test_output_is_the_teachers_top_k(capsys, tmp_path: Path, tiny_assets: Path, precompute_config, encoding) -> None:
    config = precompute_config(**{'precompute.logprobs': encoding, 'precompute.temperatures': [1.0, 2.0]})
    assert main(['precompute-teacher', str(config)]) == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert final.startswith('precompute-teacher: 390 samples,') and 'bytes/token' in final
    split = tmp_path / 'out' / 'val'
    meta = json.loads((split / 'teacher_topk.json').read_text())
    assert (meta['top_k'], meta['vocab_size'], meta['max_seq_len'], meta['samples']) == (32, 1024, 128, 390)
    assert meta['logprob_encoding']['name'] == encoding and meta['temperatures'] == [1.0, 2.0]
    assert meta['source']['samples'] == 390 and meta['parts']['count'] == 7  # 390 samples in parts of 64

    samples = _samples(split)
    source = StreamingDataset(local=str(tiny_assets / 'data' / 'val'), shuffle=False, batch_size=1)
    assert [s['sample_index'] for s in samples] == list(range(390))  # every sample once, in source order
    assert samples[0]['tokens'].dtype == np.uint16 and samples[0]['teacher_topk_ids'].dtype == np.uint16
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets / 'teacher').eval()
    for i in (0, 200, 389):  # the last sample is shorter than max_seq_len
        tokens = source[i]['tokens']
        assert np.array_equal(samples[i]['tokens'], tokens)
        with torch.no_grad():
            logits = teacher(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0, :, :1024].double()
        log_p = torch.log_softmax(logits, -1)
        encoded = decode_teacher(samples[i], 128, 2.0)
        teacher_topk = topk_teacher_from_batch(pad_teacher([encoded], len(tokens)))  # as a batch of one
        ids, logprobs, rest = (t[0] for t in teacher_topk)
        # The top 32 (this random teacher is nearly uniform, so batched fp32 may order near-ties differently).
        ids = ids.long()
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()
        assert (log_p.gather(1, ids).min(-1).values >= log_p.topk(32, -1).values[:, -1] - 1e-5).all()
        outside = torch.ones_like(log_p, dtype=torch.bool).scatter_(1, ids, False)
        rest2 = torch.log_softmax(logits / 2, -1).masked_fill(~outside, float('-inf')).logsumexp(-1)
        assert torch.allclose(rest.double(), rest2, atol=2e-3, rtol=1e-3)
        p, p_got = log_p.gather(1, ids).exp(), logprobs.double().exp()
        if encoding == 'float16':
            assert torch.allclose(p_got, p, rtol=1e-2, atol=1e-6)
        else:  # cube-rooted ratios to the top entry: within 3% wherever the ratio is at least 1%
            kept = p / p[:, :1] >= 0.01
            assert ((p_got / p - 1).abs()[kept] <= 0.03).all()


def test_rerun_on_a_complete_output_writes_nothing(capsys, tmp_path: Path, precompute_config) -> None:
    config = precompute_config()
    assert main(['precompute-teacher', str(config)]) == 0
    before = _tree(tmp_path / 'out')
    capsys.readouterr()
    assert main(['precompute-teacher', str(config)]) == 0
    assert 'is complete (390 samples' in capsys.readouterr().out
    assert _tree(tmp_path / 'out') == before


@pytest.mark.slow
def test_killed_run_is_finished_by_the_same_command(tmp_path: Path, precompute_config) -> None:
    edits = {'precompute.samples_per_part': 8}  # 49 parts: the run is killed between parts and inside one
    reference_config = precompute_config(**edits, **{'precompute.out.local': str(tmp_path / 'reference')})
    assert main(['precompute-teacher', str(reference_config)]) == 0
    config = precompute_config(**edits)
    split = tmp_path / 'out' / 'val'
    # On 1 process parts complete in order: 13 complete parts means part-00012 is written.
    kept = kill_after_parts([sys.executable, '-m', 'composer_kd', 'precompute-teacher', str(config)], split, 13, 120)
    assert 13 <= len(kept) < 49 and not (split / 'teacher_topk.json').exists()

    assert main(['precompute-teacher', str(config)]) == 0
    assert_parts_kept(split, kept)  # complete parts kept, the part being written when killed gone
    got, want = _samples(split), _samples(tmp_path / 'reference' / 'val')
    assert len(got) == len(want) == 390
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    record('SIGKILL of precompute-teacher (between parts and inside one)', 'the same command finishes it: the '
           f'{len(kept)} complete parts kept, the part being written discarded',
           lost='nothing: the dataset equals an uninterrupted run\'s, sample by sample')


def _fails(capsys: pytest.CaptureFixture, config: Path, *overrides: str, match: str) -> None:
    assert_cli_error(capsys, ['precompute-teacher', str(config), *overrides], match)


@pytest.mark.parametrize('overrides,match', [
    (['precompute.top_k=0'], 'precompute.top_k must be a positive integer, got 0'),
    (['precompute.top_k=5000'], 'precompute.top_k=5000 is more than the 1024 tokens'),
    (['precompute.logprobs=int4'], "precompute.logprobs='int4': use one of ['float16', 'uint8']"),
    (['precompute.top_k=1'], 'needs top_k >= 2'),
    (['precompute.samples_per_part=10'], 'precompute.samples_per_part=10 must be a multiple of'),
    (['precompute.device_batch_size=-1'], 'precompute.device_batch_size must be a positive integer'),
    (['precompute.temperatures=[0]'], 'precompute.temperatures must be numbers > 0'),
    (['precompute.dataset.local=/nowhere'], 'precompute.dataset: no MDS dataset at'),
    (['precompute.dataset.max_seq_len=1'], 'precompute.dataset.max_seq_len must be an integer >= 2, got 1'),
    (['precompute.out.compression=lzma'], "precompute.out.compression='lzma'"),
    (['precompute.sample_per_part=8'], 'unknown key precompute.sample_per_part'),
    (['model.student.config.n_layer=1'], 'unknown key model.student'),
    (['precompute.out=null'], 'missing required key precompute.out'),
    (['precision=amp_bf16'], "precision='amp_bf16' needs a GPU"),
    (['model.teacher.pretrained_model_name_or_path=/nope'], "folder '/nope' does not exist"),
])
def test_bad_inputs(capsys, tmp_path: Path, precompute_config, overrides: list[str], match: str) -> None:
    _fails(capsys, precompute_config(), *overrides, match=match)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_output_folders_it_must_not_touch(capsys, tmp_path: Path, tiny_assets: Path, precompute_config) -> None:
    config = precompute_config()
    _fails(capsys, config, f'precompute.out.local={tiny_assets / "data"}', match='is the source dataset')
    (tmp_path / 'out' / 'val').mkdir(parents=True)
    (tmp_path / 'out' / 'val' / 'thesis.tex').write_text('x')
    _fails(capsys, config, match='is not a precompute-teacher output')
    (tmp_path / 'out' / 'val' / 'thesis.tex').unlink()
    assert main(['precompute-teacher', str(config)]) == 0
    _fails(capsys, config, 'precompute.top_k=16', match='holds a precompute with other settings (top_k: 32 there, 16')


def test_dataset_without_tokens_is_refused(capsys, tmp_path: Path, precompute_config) -> None:
    with MDSWriter(columns={'text': 'str'}, out=str(tmp_path / 'text' / 'val')) as writer:
        writer.write({'text': 'no tokens here'})
    _fails(capsys, precompute_config(), f'precompute.dataset.local={tmp_path / "text"}',
           match="/text/val: MDS samples need a 'tokens' column")


def test_remote_output_trains_from_the_remote_alone(tmp_path: Path, tiny_assets: Path, precompute_config) -> None:
    # A local folder as the "remote" (any URI Streaming uploads to behaves the same): the parts, the merged index
    # and the metadata are uploaded; a run that has only the remote downloads the record and the shards.
    remote = tmp_path / 'remote'
    config = precompute_config(**{'precompute.out.remote': str(remote), 'precompute.samples_per_part': 128})
    assert main(['precompute-teacher', str(config)]) == 0
    split = remote / 'val'
    assert (split / 'index.json').is_file() and (split / 'teacher_topk.json').is_file()
    assert sorted(p.name for p in split.glob('part-*')) == [f'part-0000{i}' for i in range(4)]
    assert _samples(split) and len(_samples(split)) == 390
    cfg = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-offline.yaml')
    cfg.variables.assets = str(tiny_assets)
    for loader, cache in (('train_loader', 'cache-train'), ('eval_loader', 'cache-eval')):
        cfg[loader].dataset.update({'remote': str(remote), 'local': str(tmp_path / cache), 'split': 'val'})
    cfg.save_folder = None
    cfg.max_duration = '2ba'
    cfg.log_to_console = False
    offline = tmp_path / 'offline.yaml'
    OmegaConf.save(cfg, offline)
    trainer = train(load_config(str(offline)))
    assert 'TeacherDivergenceLoss' in trainer.state.eval_metrics['eval']  # the eval record came from the remote
    trainer.close()



def test_out_local_names_the_process(capsys, monkeypatch, tmp_path: Path, precompute_config) -> None:
    """``{rank}``, ``{local_rank}`` and ``{node_rank}`` in ``precompute.out.local`` come from the launcher's
    environment (a node-local folder per process, with a remote); other placeholders are refused by name."""
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setenv('NODE_RANK', '1')
    config = precompute_config(**{'precompute.out.local': str(tmp_path / 'n{node_rank}-{local_rank}-{rank}')})
    assert check_precompute_config(load_precompute_config(str(config)), 4, False).out_local == str(tmp_path / 'n1-1-3')
    _fails(capsys, config, 'precompute.out.local=/x/{run_name}',
           match="precompute.out.local='/x/{run_name}': unknown placeholder {run_name}; use {rank}, {local_rank}")


def test_parts_are_uploaded_with_their_record_last(monkeypatch, tmp_path: Path) -> None:
    """A part counts as complete on the remote once its ``part.json`` is there: it is uploaded after the shards
    and the part's ``index.json``."""
    uploaded = []

    class Recorder:

        def upload_file(self, name: str) -> None:
            uploaded.append(name)

    with topk_parts.write_part(str(tmp_path / 'val'), 0, 0, {'tokens': 'ndarray:uint16'}, 'zstd') as writer:
        writer.write({'tokens': np.arange(5, dtype=np.uint16)})
    monkeypatch.setattr(topk_parts.CloudUploader, 'get', lambda *args, **kwargs: Recorder())
    topk_parts.upload_part(str(tmp_path / 'val'), 's3://bucket/val', 0)
    assert uploaded[-2:] == ['index.json', 'part.json'] and any(n.startswith('shard.') for n in uploaded[:-2])


def _state(folder: Path, parts: dict) -> dict:
    return {'folder': str(folder), 'error': None, 'metadata': None, 'parts': parts}


def test_rank_0_decides_from_every_folder_and_the_remote(tmp_path: Path, precompute_config) -> None:
    """What rank 0 broadcasts: without a remote, different folders are refused (their parts would never meet);
    with one, the complete parts are the remote's and those any rank's folder holds (uploaded by the first rank
    that has them), and a remote planned with other settings is refused."""
    settings = check_precompute_config(load_precompute_config(str(precompute_config())), 2, False)
    plan = {'top_k': 32, 'samples_per_part': 64}
    record_of = {p: {'part': p, 'first': 64 * p, 'samples': 64, 'tokens': 100} for p in range(7)}
    states = [_state(tmp_path / 'a', {0: record_of[0], 2: record_of[2]}), _state(tmp_path / 'b', {1: record_of[1]})]
    error = precompute_record.decide(settings, plan, states, 7)['error']
    assert error.startswith(f'precompute.out.local is {tmp_path / "a"} on rank 0 but {tmp_path / "b"} on rank 1: '
                            'processes that write to different folders need precompute.out.remote')

    remote = tmp_path / 'remote'
    settings = dataclasses.replace(settings, out_remote=str(remote))
    fresh = precompute_record.decide(settings, plan, states, 7)
    assert fresh['kept'] == {p: record_of[p] for p in (0, 1, 2)} and fresh['upload_plan']
    assert fresh['uploads'] == {0: [0, 2], 1: [1]}
    (remote / 'val' / 'part-00002').mkdir(parents=True)
    (remote / 'val' / 'part-00005').mkdir(parents=True)
    (remote / 'val' / 'part-00005' / 'index.json').write_text('{}')  # an upload cut short: no part.json
    for name, content in (('precompute_plan.json', plan), ('part-00002/part.json', record_of[2])):
        (remote / 'val' / name).write_text(json.dumps(content))
    resumed = precompute_record.decide(settings, plan, states, 7)
    assert resumed['kept'] == {p: record_of[p] for p in (0, 1, 2)} and not resumed['upload_plan']
    assert resumed['uploads'] == {0: [0], 1: [1]}  # part 2 is on the remote already
    error = precompute_record.decide(settings, {**plan, 'top_k': 16}, states, 7)['error']
    assert error == (f'precompute.out.remote: {remote / "val"} holds a precompute with other settings (top_k: 32 '
                     'there, 16 now); use another folder or remove it')
