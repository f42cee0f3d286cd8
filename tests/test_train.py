"""End-to-end runs of ``composer-kd train`` in this process: teacher untouched, student-only checkpoints,
weights-only strict loading, early stopping and export."""

import functools
import http.server
import socketserver
import threading

import torch
from composer.callbacks import EarlyStopper
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_kd.cli import main
from composer_kd.config.run_config import load_config
from composer_kd.run.export import export_student
from composer_kd.run.train import build_trainer, train


def test_run_keeps_teacher_and_checkpoints_student_only(tmp_path, tiny_assets, write_config) -> None:
    config = write_config(max_duration='4ba', save_interval='2ba', eval_interval='2ba', eval_subset_num_batches=1)
    trainer = train(load_config(str(config)))
    model = trainer.state.model

    on_disk = load_file(tiny_assets / 'teacher' / 'model.safetensors')
    teacher_state = model.teachers[0].state_dict()
    assert all(torch.equal(teacher_state[k], v) for k, v in on_disk.items())  # bit-identical after training
    teacher_ids = {id(p) for p in model.teachers.parameters()}
    optimizer_params = [p for group in trainer.state.optimizers[0].param_groups for p in group['params']]
    assert optimizer_params and not teacher_ids & {id(p) for p in optimizer_params}
    assert len(optimizer_params) == len(list(model.model.parameters()))

    checkpoint = tmp_path / 'runs' / 'tiny-cpu' / 'checkpoints' / 'ep0-ba4-rank0.pt'
    state = torch.load(checkpoint, weights_only=False)['state']
    assert state['model'] and not [k for k in state['model'] if 'teacher' in k]
    assert set(state) >= {'optimizers', 'schedulers', 'timestamp', 'dataset_state'}
    adam_state = state['optimizers']['DecoupledAdamW']['state']
    assert len(adam_state) == len(optimizer_params)  # moments for student parameters only

    # Weights-only loading with strict model weights (Composer's default) of a student-only checkpoint.
    cfg = load_config(str(config), [f'load_path={checkpoint}', 'load_weights_only=true', 'max_duration=1ba',
                                    'save_folder=null', 'eval_loader=null'])
    loaded = build_trainer(cfg).state.model
    student_state = model.model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in student_state.items())

    out = tmp_path / 'exported'
    assert main(['export', str(checkpoint), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in student_state.items())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer').get_vocab()
    assert main(['export', str(checkpoint), str(out)]) == 2  # refuses to overwrite without --overwrite

    # A remote checkpoint (here over HTTP from this machine), downloaded with Composer's get_file.
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(checkpoint.parent))
    with socketserver.TCPServer(('127.0.0.1', 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f'http://127.0.0.1:{server.server_address[1]}/{checkpoint.name}'
        try:
            assert main(['export', url, str(tmp_path / 'from-http')]) == 0
        finally:
            server.shutdown()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / 'from-http')
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in student_state.items())


def test_early_stopper_stops_when_the_eval_metric_stops_improving(write_config) -> None:
    # With lr = 0 the eval cross-entropy never improves, so a 2-batch patience stops a 30-batch run early.
    config = write_config(**{
        'max_duration': '30ba',
        'eval_interval': '1ba',
        'eval_subset_num_batches': 1,
        'optimizer.lr': 0.0,
        'save_folder': None,
        'callbacks.early_stopper': {'monitor': 'LanguageCrossEntropy', 'dataloader_label': 'eval', 'patience': '2ba'},
    })
    trainer = train(load_config(str(config)))
    stopper = next(c for c in trainer.state.callbacks if isinstance(c, EarlyStopper))
    assert stopper.comp_func is torch.less  # chosen for LanguageCrossEntropy, where Composer would guess 'greater'
    assert 2 <= trainer.state.timestamp.batch.value <= 4


def test_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path) -> None:
    try:
        export_student(str(tmp_path / 'nope.pt'), str(tmp_path / 'out'))
    except ValueError as e:
        assert 'no such file or folder' in str(e)
    else:
        raise AssertionError('export of a missing checkpoint did not fail')


def test_monolithic_autoresume_restores_student_optimizer_and_progress(write_config) -> None:
    config = str(write_config(save_interval='2ba', eval_loader=None, autoresume=True))
    first = train(load_config(config, ['max_duration=2ba']))
    saved_student = {k: v.clone() for k, v in first.state.model.model.state_dict().items()}
    saved_moments = first.state.optimizers[0].state_dict()['state']

    resumed = build_trainer(load_config(config, ['max_duration=4ba']))  # same run_name: picks up latest-rank0.pt
    assert resumed.state.timestamp.batch.value == 2
    assert all(torch.equal(resumed.state.model.model.state_dict()[k], v) for k, v in saved_student.items())
    moments = resumed.state.optimizers[0].state_dict()['state']
    assert moments.keys() == saved_moments.keys()
    assert all(torch.equal(moments[i]['exp_avg'], saved_moments[i]['exp_avg']) for i in moments)
    resumed.fit()
    assert resumed.state.timestamp.batch.value == 4
