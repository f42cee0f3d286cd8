"""``prepare-data`` throughput and memory: tokens/s at 1 and 2 workers on the quickstart corpus (this interpreter's
standard library, as the quickstart reads it), and peak memory on one text file of each size, to show it does not
grow with the file.

Every measurement runs in a fresh process (``--one``), which prints its wall time, tokens and peak RSS: its own
(``ru_maxrss``) and the largest of its workers' (sampled every 0.1 s: ``RUSAGE_CHILDREN`` would report the
main process's size, which a spawned worker has for an instant between its fork and its exec). Prints one JSON
object.

    python benchmarks/prepare_data.py                                  # about 10 minutes on 2 CPU cores
    python benchmarks/prepare_data.py --sizes-mb 16 64 --repeats 1     # a minute
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def _one(args: argparse.Namespace) -> None:
    import threading

    import psutil

    from composer_kd.data.prepare import prepare_data
    workers_peak = [0.0]
    done = threading.Event()

    def sample() -> None:  # the workers' RSS, read every 0.1 s (see the module docstring)
        while not done.wait(0.1):
            for child in psutil.Process().children(recursive=True):
                try:
                    workers_peak[0] = max(workers_peak[0], child.memory_info().rss / 2**20)
                except psutil.Error:
                    pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    summary = prepare_data(args.input, args.tokenizer, args.out, 128, val_fraction=0.05, extensions=['.py', '.txt'],
                           workers=args.workers, progress_bar=False)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    print(json.dumps({
        'wall_s': wall,
        'tokens': sum(split['tokens'] for split in summary.values()),
        'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        'worker_peak_rss_mb': workers_peak[0],
    }))


def _measure(inputs: list[str], tokenizer: str, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, '--one', '--tokenizer', tokenizer, '--out', str(out), '--workers', str(workers),
           '--input', *inputs]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tokenizer(work: Path, corpus: str, given: str | None) -> str:
    if given:
        return given
    from composer_kd.quickstart.pipeline import DEFAULT, corpus_files
    from composer_kd.quickstart.tiny_assets import train_bpe_tokenizer
    files = [os.path.join(corpus, f) for f in corpus_files(corpus, None)]
    train_bpe_tokenizer(files, DEFAULT.vocab_size, str(work / 'tokenizer'))  # the quickstart's: BPE, 4,096 tokens
    return str(work / 'tokenizer')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--one', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--input', nargs='+', help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    parser.add_argument('--workers', type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument('--tokenizer', default=None, help='tokenizer folder (default: train the quickstart\'s)')
    parser.add_argument('--sizes-mb', type=int, nargs='*', default=[64, 1024],
                        help='text file sizes (default 64 1024; none: throughput only)')
    parser.add_argument('--repeats', type=int, default=3, help='throughput runs per worker count (median)')
    args = parser.parse_args()
    if args.one:
        _one(args)
        return
    corpus = sysconfig.get_paths()['stdlib']
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from composer_kd.quickstart.pipeline import corpus_files
        files = corpus_files(corpus, None)  # the quickstart's corpus: no tests, GUIs or installed packages
        for rel in files:
            (work / 'corpus' / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(corpus, rel), work / 'corpus' / rel)
        tokenizer = _tokenizer(work, str(work / 'corpus'), args.tokenizer)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both alike
            for workers in runs:
                runs[workers].append(_measure([str(work / 'corpus')], tokenizer, work / 'out', workers))
        rate = {w: statistics.median(r['tokens'] / r['wall_s'] for r in rs) for w, rs in runs.items()}
        # One text file of each size, the corpus's .py files concatenated over and over.
        text = ''.join((work / 'corpus' / f).read_text(errors='replace') for f in files)
        memory = {}
        for size in args.sizes_mb:
            big = work / 'big.txt'
            with open(big, 'w') as f:
                for _ in range(size * 2**20 // len(text) + 1):
                    f.write(text)
            result = _measure([str(big)], tokenizer, work / 'out', 2)
            memory[f'{size}_mb'] = {k: round(v, 1) for k, v in result.items()}
            big.unlink()
    print(json.dumps({
        'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
                   f'Python {platform.python_version()}',
        'corpus': f'{corpus} ({len(files)} .py files, as the quickstart reads it)',
        'tokens': runs[1][0]['tokens'],
        'tokens_per_s': {f'{w}_workers': round(r) for w, r in rate.items()},
        'speedup_2_workers': round(rate[2] / rate[1], 2),
        'one_file_2_workers': memory,
    }, indent=1))


if __name__ == '__main__':
    main()
