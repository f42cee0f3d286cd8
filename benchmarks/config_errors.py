"""How long a config mistake takes to be reported: ``composer-kd`` commands with one mistake each, timed from the
process's start to its exit (status 2, one line). Prints JSON: each case's seconds and message, median and max.

    python benchmarks/config_errors.py [--repeats 3]

A config is read and checked against its schema and rules before torch is imported (``composer_kd/config``); the
figures in docs/ come from this script.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# (arguments after `composer-kd`, a piece of the expected message)
CASES = [
    (['train', 'tiny-cpu', 'foo=1'], "unknown top-level key 'foo'"),
    (['train', 'tiny-cpu', 'model.distillation.alpah=0.5'], "did you mean 'alpha'"),
    (['train', 'tiny-cpu', 'model.distillation.alpha=1.5'], 'model.distillation.alpha must be a number in [0, 1]'),
    (['train', 'tiny-cpu', 'max_duration=10xx'], 'max_duration must be a positive time'),
    (['train', 'tiny-cpu', 'precision=bf16'], "precision='bf16': use one of"),
    (['train', 'tiny-cpu', 'optimizer.name=adamww'], "optimizer: unknown name 'adamww'"),
    (['train', 'tiny-cpu', 'global_train_batch_size=8', 'device_train_microbatch_size=3'], 'does not divide'),
    (['train', 'tiny-cpu', 'model.student.pretrained_model_name_or_path=./nope'], "folder './nope' does not exist"),
    (['train', 'no-such-recipe.yaml'], 'config file not found'),
    (['train', 'tiny-cpu', 'model.distillation'], 'must look like key=value'),
    (['precompute-teacher', 'tiny-cpu-precompute', 'precompute.top_k=0'], 'precompute.top_k must be a positive'),
    (['eval', '--models', '.', '--data', '.'], 'max_seq_len must be an integer >= 2'),
]


def _run(args: list[str], cwd: str) -> tuple[float, int, list[str]]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, '-m', 'composer_kd', *args], cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode, proc.stderr.strip().splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=3, help='runs per case; the median is reported')
    args = parser.parse_args()
    cwd = tempfile.mkdtemp()
    try:
        results = []
        for case, expected in CASES:
            runs = [_run(case, cwd) for _ in range(args.repeats)]
            seconds, status, lines = statistics.median(r[0] for r in runs), runs[0][1], runs[0][2]
            ok = status == 2 and len(lines) == 1 and expected in lines[0]
            results.append({'command': 'composer-kd ' + ' '.join(case), 'seconds': round(seconds, 3),
                            'exit': status, 'one_line': len(lines) == 1, 'as_expected': ok,
                            'message': lines[-1] if lines else ''})
        times = [r['seconds'] for r in results]
        print(json.dumps({'cases': results, 'median_s': round(statistics.median(times), 3), 'max_s': max(times),
                          'all_as_expected': all(r['as_expected'] for r in results), 'cpus': os.cpu_count()},
                         indent=1))
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


if __name__ == '__main__':
    main()
