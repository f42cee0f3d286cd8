"""On-policy distillation's step on CPU, beside TRL's ``GKDTrainer`` (``lmbda`` 1): tokens generated per second and
where a step's time goes (generate / teacher forward / student forward / the rest).

Both train the same tiny student against the same tiny teacher (``composer-kd make-tiny-assets``) on the same
prompts in the same order, ``--batch`` prompts a step (one microbatch), ``--max-new-tokens``, sampling at
temperature 1 over the whole vocabulary, reverse KL(student‖teacher) at T 1 (TRL: ``beta`` 1), AdamW at the same
learning rate, no gradient clipping, fp32, ``--threads`` threads:

* ``composer_kd``: ``yamls/tiny-cpu-on-policy.yaml`` with ``on_policy.fraction: 1`` through ``build_trainer`` and
  Composer's ``fit`` (``train.py``'s path, no evaluation or checkpoints);
* ``trl``: ``trl.GKDTrainer`` (installed version) with ``lmbda=1``, ``seq_kd=False``, the prompts given as text
  (``DataCollatorForChatML`` re-tokenizes them: the script checks it gets the same ids), a sequential sampler.

The split is measured the same way for both, on the models themselves: the student's ``generate`` is wrapped (time,
positions decoded, tokens up to and including the first EOS), forward hooks time the teacher's forwards and the
student's forwards with gradients on (the training forward; the generation's forwards run without); a step is
timed from the trainer's step-start event to its step-end event (Composer: BEFORE_DATALOADER → BATCH_END, so the
prompt batch's rewrite is inside; HF: ``on_step_begin`` → ``on_step_end``). "rest" is the step minus the three:
the loss, backward, optimizer, building the training batch and the framework. To keep a busy machine from favouring
one side, the two run in alternating rounds (``--rounds`` × ``--steps``, after ``--warmup`` steps each; by default one
step of each per round, who goes first alternating) in one process, on the same batches; medians over the measured
steps, and — the comparison a shared machine cannot move much — the median over rounds of the per-round ratio TRL /
composer-kd, for the step and for each part.

Known differences that matter for the comparison (TRL 0.19.1, read in its source):

* TRL left-pads each batch's prompts to the batch's longest prompt; composer-kd to the prompt dataset's longest
  (so a prompt's continuation does not depend on its batch), which costs prefill positions;
* TRL's training forward runs on the left-padded prompt + continuation without ``position_ids``; composer-kd
  right-aligns each row (positions as in generation) and cuts the batch to its longest row;
* TRL samples with ``torch.multinomial`` (one generator for the batch); composer-kd with Gumbel noise keyed by (seed,
  step, sample id), a hash over the vocabulary at every position;
* when pad == EOS (not the case here), TRL masks the terminating EOS out of labels and attention;
* TRL normalises per microbatch, composer-kd over the batch's scored tokens (one microbatch here: the same);
* TRL 0.19's ``SFTConfig`` (so ``GKDConfig``) defaults to ``bf16=True`` — bf16 autocast, on a CPU too, where it made
  its forwards several times slower here; the script sets ``bf16=False`` (fp32 on both sides).

    python benchmarks/on_policy.py                  # tiny assets made under a temporary folder if not given
    python benchmarks/on_policy.py --assets tiny-assets --rounds 24 --steps 1
    python benchmarks/on_policy.py --quick          # CI: a few steps, that everything runs and reports

Then ``generation_probe`` takes the generation apart (``--probe-rounds``): composer-kd's against the same sampler on
prompts cut to the batch's longest prompt and against Hugging Face's ``torch.multinomial`` sampling (TRL's), on the
same student and prompt batches, interleaved.

JSON on stdout; no timing is asserted anywhere.
"""

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / 'yamls' / 'tiny-cpu-on-policy.yaml'
PARTS = ('generate', 'teacher_forward', 'student_forward')


class Split:
    """Times the parts of a step on the models themselves (see the module)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, eos_ids: Sequence[int]) -> None:
        self.eos_ids = list(eos_ids)
        self.reset()
        original = student.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.seconds['generate'] += time.perf_counter() - start
            sequences = out.sequences if hasattr(out, 'sequences') else out
            new = sequences[:, kwargs['input_ids'].shape[1]:]
            self.decoded += new.numel()
            self.useful += int(self._lengths(new).sum())
            return out

        student.generate = generate  # an instance attribute: both trainers call model.generate(input_ids=...)
        self._timer(teacher, 'teacher_forward', lambda: True)
        self._timer(student, 'student_forward', torch.is_grad_enabled)  # generation's forwards run without grad

    def _lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        from composer_kd.data.rollout_batches import continuation_lengths
        return continuation_lengths(tokens, self.eos_ids)[0]

    def _timer(self, module: torch.nn.Module, part: str, when: Any) -> None:
        started: list[float] = []

        def pre(*_: Any) -> None:
            if when():
                started.append(time.perf_counter())

        def post(*_: Any) -> None:
            if started:
                self.seconds[part] += time.perf_counter() - started.pop()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def reset(self) -> None:
        self.seconds = {part: 0.0 for part in PARTS}
        self.decoded = self.useful = 0

    def take(self, total: float) -> dict[str, float]:
        """This step's record (and a fresh start for the next)."""
        record = {'step_s': total, **{f'{p}_s': s for p, s in self.seconds.items()},
                  'rest_s': total - sum(self.seconds.values()), 'decoded_positions': self.decoded,
                  'generated_tokens': self.useful}
        self.reset()
        return record


# -- composer-kd ------------------------------------------------------------------------------------------------------
def build_ours(args: argparse.Namespace, records: list[dict[str, float]]) -> tuple[Any, Split]:
    from composer.core import Callback

    from composer_kd.callbacks import OnPolicyDistillation
    from composer_kd.config.run_config import load_config
    from composer_kd.run.train import build_trainer
    cfg = load_config(str(RECIPE), [
        f'variables.assets={args.assets}', 'model.distillation.on_policy.fraction=1.0',
        f'model.distillation.on_policy.max_new_tokens={args.max_new_tokens}', 'model.distillation.alpha=0.0',
        f'global_train_batch_size={args.batch}', f'device_train_microbatch_size={args.batch}',
        'train_loader.dataset.shuffle=false', 'eval_loader=null', 'save_folder=null', 'callbacks=null',
        'max_duration=100000ba', f'optimizer.lr={args.lr}', 'scheduler=null', 'log_to_console=false',
        'seed=17'])
    trainer = build_trainer(cfg)
    model = trainer.state.model
    rollout = next(c for c in trainer.state.callbacks if isinstance(c, OnPolicyDistillation))
    split = Split(model.model, model.teachers.members[0], rollout.eos_ids)

    class Steps(Callback):
        start = 0.0

        def before_dataloader(self, state: Any, logger: Any) -> None:
            self.start = time.perf_counter()

        def batch_end(self, state: Any, logger: Any) -> None:
            records.append(split.take(time.perf_counter() - self.start))

    trainer.state.callbacks.append(Steps())
    return trainer, split


# -- TRL --------------------------------------------------------------------------------------------------------------
def trl_dataset(args: argparse.Namespace, tokenizer: Any) -> tuple[list[dict[str, Any]], int]:
    """The train prompts in the order composer-kd reads them (index order, no shuffle), as text; and how many
    re-tokenize to other ids than composer-kd's."""
    from composer_kd.data.prompts import PromptDataset
    data = PromptDataset(local=str(Path(args.assets) / 'prompts'), split='train', shuffle=False)
    rows, differ = [], 0
    for i in range(len(data)):
        sample = data[i]
        prompt_ids, response_ids = sample['prompt_ids'].tolist(), sample['response_ids'].tolist()
        text = tokenizer.decode(prompt_ids)
        differ += tokenizer(text, add_special_tokens=False)['input_ids'] != prompt_ids
        rows.append({'prompt': text, 'input_ids': prompt_ids + response_ids})
    return rows, differ


def build_trl(args: argparse.Namespace, records: list[dict[str, float]], folder: str) -> tuple[Any, Split, int]:
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GKDConfig, GKDTrainer
    assets = Path(args.assets)
    tokenizer = AutoTokenizer.from_pretrained(assets / 'tokenizer')
    student = AutoModelForCausalLM.from_pretrained(assets / 'student')
    teacher = AutoModelForCausalLM.from_pretrained(assets / 'teacher')
    # GKDTrainer takes the EOS from the student's generation config (GPT-2's default 50256 is not in this
    # vocabulary): the tokenizer's, as composer-kd uses.
    student.generation_config.eos_token_id = tokenizer.eos_token_id
    rows, differ = trl_dataset(args, tokenizer)
    config = GKDConfig(
        output_dir=folder, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type='constant', warmup_steps=0, optim='adamw_torch', adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=0.0, lmbda=1.0, beta=1.0,
        temperature=1.0, max_new_tokens=args.max_new_tokens, seq_kd=False, logging_steps=10**6, save_strategy='no',
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=17,
        dataset_kwargs={'skip_prepare_dataset': True}, max_steps=1,
        bf16=False, fp16=False)  # TRL 0.19's SFTConfig defaults to bf16 autocast, on CPU too: fp32, as composer-kd

    class SequentialGKD(GKDTrainer):
        def _get_train_sampler(self, *_: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)  # the same order as composer-kd's unshuffled stream

    trainer = SequentialGKD(model=student, teacher_model=teacher, args=config,
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    trainer.full_dataset = trainer.train_dataset
    split = Split(student, trainer.teacher_model, [tokenizer.eos_token_id])

    class Steps(TrainerCallback):
        start = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            records.append(split.take(time.perf_counter() - self.start))

    trainer.add_callback(Steps())
    trainer.remove_callback(PrinterCallback)  # it prints each train()'s summary to stdout, which is the JSON's
    return trainer, split, differ


def trl_steps(trainer: Any, first: int, count: int, batch: int) -> None:
    """``count`` steps on batches ``first`` … of the prompts (a new ``train()`` over that slice)."""
    trainer.train_dataset = trainer.full_dataset.select(range(first * batch, (first + count) * batch))
    trainer.args.max_steps = count
    trainer.train()


# -- where composer-kd's generation time goes -------------------------------------------------------------------------
def generation_probe(args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    """The student's generation alone, three ways on the same prompt batches, interleaved round by round (who goes
    first rotating): composer-kd's (``generate_continuations``: prompts at the dataset's width, ``SeededGumbelSampler``),
    the same sampler on prompts cut to the batch's longest, and Hugging Face's ``do_sample`` (``torch.multinomial``) on
    those — what TRL does. Median per-round time ratio to composer-kd's, and decoded positions per second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer_kd.data.prompts import PromptDataset, collate_prompts, read_prompts_info
    from composer_kd.model.generation import generate_continuations
    from composer_kd.model.sampling import SeededGumbelSampler, row_keys
    assets = Path(args.assets)
    tokenizer = AutoTokenizer.from_pretrained(assets / 'tokenizer')
    student = AutoModelForCausalLM.from_pretrained(assets / 'student').eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = read_prompts_info(str(assets / 'prompts'))['prompt_width']
    data = PromptDataset(local=str(assets / 'prompts'), split='train', shuffle=False)
    batches = [collate_prompts([data[i] for i in range(b * args.batch, (b + 1) * args.batch)], pad, width)
               for b in range(rounds + 1)]

    def trimmed(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        first = int(batch['prompt_mask'].any(dim=0).nonzero()[0])  # the batch's longest prompt starts here
        return batch['prompt_ids'][:, first:], batch['prompt_mask'][:, first:]

    def seeded(ids: torch.Tensor, mask: torch.Tensor, batch: dict[str, torch.Tensor]) -> int:
        sampler = SeededGumbelSampler(row_keys(17, 0, batch['sample_id']), ids.shape[1])
        tokens, _ = generate_continuations(student, ids, mask, sampler, args.max_new_tokens, [eos], pad, 1)
        return tokens.numel()

    def multinomial(batch: dict[str, torch.Tensor]) -> int:
        ids, mask = trimmed(batch)
        with torch.no_grad():
            out = student.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                   temperature=1.0, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                   pad_token_id=pad)
        return out[:, ids.shape[1]:].numel()

    ways = {'composer_kd': lambda b: seeded(b['prompt_ids'], b['prompt_mask'], b),
            'seeded_gumbel_batch_width': lambda b: seeded(*trimmed(b), b),
            'multinomial_batch_width': multinomial}
    names = list(ways)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    positions: dict[str, int] = {n: 0 for n in names}
    for r, batch in enumerate(batches):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            decoded = ways[name](batch)
            if r:  # the first round warms up
                seconds[name].append(time.perf_counter() - start)
                positions[name] += decoded
    prompt_tokens = [int(b['prompt_mask'].sum()) for b in batches]
    return {
        'rounds': rounds, 'dataset_prompt_width': width,
        'batch_prompt_width_mean': statistics.mean(trimmed(b)[0].shape[1] for b in batches),
        'prompt_tokens_per_row_mean': statistics.mean(prompt_tokens) / args.batch,
        'call_s_median': {n: statistics.median(v) for n, v in seconds.items()},
        'time_ratio_to_composer_kd': {n: statistics.median(t / c for t, c in zip(seconds[n], seconds['composer_kd']))
                                      for n in names},
        'decoded_positions_per_s': {n: positions[n] / sum(seconds[n]) for n in names},
    }


# -- the comparison ---------------------------------------------------------------------------------------------------
def summarize(records: list[dict[str, float]]) -> dict[str, Any]:
    median = lambda key: statistics.median(r[key] for r in records)
    generate = sum(r['generate_s'] for r in records)
    out = {'steps': len(records), 'step_s_median': median('step_s'),
           'split_s_median': {p: median(f'{p}_s') for p in (*PARTS, 'rest')},
           'split_share': {p: sum(r[f'{p}_s'] for r in records) / sum(r['step_s'] for r in records)
                           for p in (*PARTS, 'rest')},
           'decoded_positions_per_s': sum(r['decoded_positions'] for r in records) / generate,
           'generated_tokens_per_s': sum(r['generated_tokens'] for r in records) / generate,
           'generated_tokens_per_step': statistics.mean(r['generated_tokens'] for r in records)}
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--assets', help='composer-kd make-tiny-assets --out DIR (made in a temporary folder if '
                        'not given)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--max-new-tokens', type=int, default=32)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--rounds', type=int, default=24)
    parser.add_argument('--steps', type=int, default=1, help='steps of each trainer per round (default 1)')
    parser.add_argument('--warmup', type=int, default=3, help='unmeasured steps of each trainer first')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--probe-rounds', type=int, default=12, help='rounds of the generation probe (0: none)')
    parser.add_argument('--quick', action='store_true', help='2 rounds of 1 step, 8 new tokens (CI)')
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.max_new_tokens, args.probe_rounds = 2, 1, 1, 8, 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings('ignore')
    import trl
    with tempfile.TemporaryDirectory() as tmp:
        if args.assets is None:
            from composer_kd.quickstart.tiny_assets import make_tiny_assets
            args.assets = make_tiny_assets(os.path.join(tmp, 'assets'))
        ours_records: list[dict[str, float]] = []
        trl_records: list[dict[str, float]] = []
        # TRL first: Accelerate decides once whether it runs distributed, and Composer then initializes a 1-process
        # group, which would make Accelerate wrap the student in DDP (an extra all-reduce and graph traversal).
        theirs, _, differ = build_trl(args, trl_records, os.path.join(tmp, 'trl'))
        ours, _ = build_ours(args, ours_records)
        ours.fit(duration=f'{args.warmup}ba')
        trl_steps(theirs, 0, args.warmup, args.batch)
        del ours_records[:], trl_records[:]
        ratios: dict[str, list[float]] = {key: [] for key in ('step', *PARTS, 'rest')}
        for r in range(args.rounds):  # alternate who goes first
            first = args.warmup + r * args.steps
            runs = [lambda: ours.fit(duration=f'{args.steps}ba'),
                    lambda first=first: trl_steps(theirs, first, args.steps, args.batch)]
            for run in (runs if r % 2 == 0 else runs[::-1]):
                run()
            for key in ratios:
                ours_round = statistics.median(x[f'{key}_s'] for x in ours_records[-args.steps:])
                trl_round = statistics.median(x[f'{key}_s'] for x in trl_records[-args.steps:])
                ratios[key].append(trl_round / ours_round)
        ours.close()
        probe = generation_probe(args, args.probe_rounds) if args.probe_rounds else None
    result = {
        'machine': {'platform': platform.platform(), 'processor': platform.processor(), 'cpus': os.cpu_count(),
                    'threads': torch.get_num_threads(), 'torch': torch.__version__, 'trl': trl.__version__},
        'date': datetime.date.today().isoformat(),
        'settings': {k: v for k, v in vars(args).items() if k != 'assets'},
        'composer_kd': summarize(ours_records), 'trl': summarize(trl_records),
        'trl_over_composer_kd_step_s': {'median_of_round_ratios': statistics.median(ratios['step']),
                                        'rounds': [round(x, 3) for x in ratios['step']]},
        'trl_over_composer_kd_parts_s': {key: statistics.median(v) for key, v in ratios.items() if key != 'step'},
        'prompts_retokenized_differently_for_trl': differ,
        'trl_student_wrapped_as': type(theirs.model_wrapped).__name__,  # not DistributedDataParallel
        'trl_mixed_precision': theirs.accelerator.mixed_precision,
        'generation_probe': probe,
    }
    import json
    print(json.dumps(result, indent=1))
    return result


if __name__ == '__main__':
    main()
