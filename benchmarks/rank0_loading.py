"""Peak host memory of each rank when a big teacher loads on every rank (``init_device: cpu``) or on rank 0 only
(``init_device: mixed``: the other ranks build on ``meta`` and receive their shards from FSDP2).

Makes a GPT-2-style teacher of about 300 MB (fp32) for the tiny tokenizer, runs the tiny recipe for a few steps
on 2 processes with FSDP2 (CPU, gloo) once per mode, and once with the tiny teacher (what a rank costs without a
big teacher), and prints one JSON object: the teacher's size, each rank's peak RSS (``ru_maxrss``) when training
starts and over the whole run, what the big teacher adds to rank 1's peaks per mode (its share is half the
teacher), and whether the two modes trained the same student (every exported weight ``torch.equal``). Two more
runs (big and tiny teacher, ``mixed``) trace the live memory at each teacher block's entry and exit: what rank 1
holds while the teacher runs, apart from the collectives' own transient buffers.

    python benchmarks/rank0_loading.py                 # about 5 minutes on 2 CPU cores
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

# Each rank runs the CLI through this snippet, which prints its peak RSS when training starts (everything loaded,
# sharded and synced) and when it exits (training steps included). With TRACE_BLOCKS=1 it also prints the most
# live memory seen at the entry and exit of the teacher's FSDP units (each transformer block) during training:
# RSS read after ``malloc_trim(0)``, so memory glibc keeps after a free does not count (that run's peaks are not
# reported: trimming lowers them).
_RANK = ('import atexit, ctypes, os, resource, sys\n'
         'import psutil\n'
         'from composer import Trainer\n'
         'def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n'
         'live = [0.0]\n'
         'def record(*args):\n'
         '    ctypes.CDLL("libc.so.6").malloc_trim(0)\n'
         '    live[0] = max(live[0], psutil.Process().memory_info().rss / 2**20)\n'
         'def trace(model):\n'
         '    from torch.distributed.fsdp import FSDPModule\n'
         '    for unit in model.teachers.modules():\n'
         '        if isinstance(unit, FSDPModule):\n'
         '            unit.register_forward_pre_hook(record)\n'
         '            unit.register_forward_hook(record)\n'
         'fit = Trainer.fit\n'
         'def traced(self, *a, **k):\n'
         '    print(f"LOADED_PEAK_MB {os.environ[\'RANK\']} {peak():.1f}", flush=True)\n'
         '    if os.environ.get("TRACE_BLOCKS") == "1":\n'
         '        from composer_kd.callbacks.unwrap import composer_model\n'
         '        trace(composer_model(self.state))\n'
         '    return fit(self, *a, **k)\n'
         'Trainer.fit = traced\n'
         'atexit.register(lambda: print(f"PEAK_RSS_MB {os.environ[\'RANK\']} {peak():.1f}", flush=True))\n'
         'atexit.register(lambda: print(f"BLOCK_LIVE_MB {os.environ[\'RANK\']} {live[0]:.1f}", flush=True))\n'
         'from composer_kd.cli import main\n'
         'sys.exit(main(sys.argv[1:]))\n')


def _big_teacher(assets: Path, out: Path, layers: int, width: int) -> float:
    """The tiny teacher's config (vocabulary, positions) at ``layers`` × ``width``; returns its size in MB."""
    config = AutoConfig.from_pretrained(assets / 'teacher')
    config.update({'n_layer': layers, 'n_embd': width, 'n_head': width // 64})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def _run(work: Path, assets: Path, teacher: Path, mode: str, steps: int, name: str,
         trace: bool = False) -> dict[str, float]:
    script = work / 'rank.py'
    script.write_text(_RANK)
    logs = ['--stdout', str(work / f'{name}-rank{{rank}}.out'), '--stderr', str(work / f'{name}-rank{{rank}}.err')]
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', *logs, str(script), 'train', 'tiny-cpu',
           f'variables.assets={assets}', f'model.teacher.pretrained_model_name_or_path={teacher}',
           f'model.student.init_device={mode}', f'model.teacher.init_device={mode}', f'max_duration={steps}ba',
           'eval_loader=null', f'save_interval={steps}ba', 'fsdp_config={state_dict_type: sharded}',
           f'save_folder={work / name}', 'log_to_console=false', 'progress_bar=false']
    env = dict(os.environ, FSDP_VERSION='2', TRACE_BLOCKS='1' if trace else '0')
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        errors = ''.join(p.read_text()[-2000:] for p in work.glob(f'{name}-rank*.err'))
        raise SystemExit(f'{name} run failed ({proc.returncode}): {proc.stderr[-2000:]}{errors}')
    # Rank 0 prints to the launcher's stdout, the others to their --stdout files.
    texts = [proc.stdout, *(out.read_text() for out in sorted(work.glob(f'{name}-rank*.out')))]
    if trace:
        found = [m for text in texts for m in re.findall(r'BLOCK_LIVE_MB (\d+) ([0-9.]+)', text)]
        return {f'rank{rank}_live_mb': float(mb) for rank, mb in sorted(found)}
    peaks = {}
    for tag, phase in (('LOADED_PEAK_MB', 'loaded'), ('PEAK_RSS_MB', 'run')):
        found = [m for text in texts for m in re.findall(rf'{tag} (\d+) ([0-9.]+)', text)]
        peaks.update({f'rank{rank}_{phase}_peak_mb': float(mb) for rank, mb in sorted(found)})
    export = work / f'{name}-student'
    subprocess.run([sys.executable, '-m', 'composer_kd', 'export', str(work / name / f'ep0-ba{steps}'), str(export)],
                   check=True, capture_output=True)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', type=int, default=6, help='teacher layers (default 6)')
    parser.add_argument('--width', type=int, default=1024, help='teacher width (default 1024: ~300 MB with 6 layers)')
    parser.add_argument('--steps', type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assets = work / 'assets'
        subprocess.run([sys.executable, '-m', 'composer_kd', 'make-tiny-assets', '--out', str(assets)], check=True,
                       capture_output=True)
        teacher_mb = _big_teacher(assets, work / 'teacher', args.layers, args.width)
        runs = {mode: _run(work, assets, work / 'teacher', mode, args.steps, mode) for mode in ('cpu', 'mixed')}
        # The same run with the tiny teacher (0.2 MB): what a rank costs without the big one (torch, data, student).
        runs['tiny_teacher'] = _run(work, assets, assets / 'teacher', 'mixed', args.steps, 'tiny')
        # Live memory inside the teacher's forward (see _RANK), big teacher with `mixed` against the tiny teacher.
        live = {name: _run(work, assets, teacher, 'mixed', args.steps, f'trace-{name}', trace=True)
                for name, teacher in (('big', work / 'teacher'), ('tiny', assets / 'teacher'))}
        students = [load_file(work / f'{mode}-student' / 'model.safetensors') for mode in ('cpu', 'mixed')]
        same = students[0].keys() == students[1].keys() and all(torch.equal(students[0][k], students[1][k])
                                                                for k in students[0])
    print(json.dumps({
        'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}',
        'teacher_mb': round(teacher_mb, 1),
        'processes': 2,
        'peak_rss_mb': runs,
        # Beyond the tiny-teacher run, on rank 1 (its share of the teacher is teacher_mb / 2): once everything is
        # loaded, sharded and synced (before the first step), and over the whole run (training steps included).
        'rank1_teacher_cost_mb': {
            mode: {phase: round(runs[mode][f'rank1_{phase}_peak_mb'] - runs['tiny_teacher'][f'rank1_{phase}_peak_mb'],
                                1) for phase in ('loaded', 'run')} for mode in ('cpu', 'mixed')
        },
        # The most live memory (after malloc_trim) at any teacher block's entry or exit during training, on
        # rank 1, beyond the tiny-teacher run: its share plus the blocks FSDP has gathered at that moment.
        'rank1_live_in_teacher_forward_mb': round(live['big']['rank1_live_mb'] - live['tiny']['rank1_live_mb'], 1),
        'same_student': same,
    }, indent=1))


if __name__ == '__main__':
    main()
