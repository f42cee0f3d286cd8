"""Does on-policy distillation pay on a real teacher, at equal compute? The demo table of ``docs/on-policy.md``.

Teacher: SmolLM2-135M-Instruct (``composer-kd make-example-teacher``; 30 blocks, ChatML, EOS ``<|im_end|>``).
Student: 7 of its blocks (``model.student.from_teacher: {every: 5, keep_first, keep_last}``: 0, 4, 9, …, 29),
embeddings and head copied — before training it writes noise. Everything is made offline on this machine:

1. **prompts**: short functions of the Python standard library (2–6 lines, at most 200 characters) as chat prompts
   ``In one sentence, what does this Python function do?`` under a one-line system message;
2. **dataset responses**: the *teacher's* greedy answers (at most ``--max-new-tokens``), so "off-policy" means
   distillation on the teacher's own text; ``prepare-data --prompts`` (``prepare_prompts``) splits them, ~20% held
   out (``val``), a cut answer keeping no EOS;
3. **equal compute**: one training step of each arm interleaved round after round in one process (the quickstart's
   paired step-cost method, ``paired_step_costs``, with the prompt batch rewritten by the run's own
   ``OnPolicyDistillation.transform`` — generation included); each arm gets ``--on-policy-steps`` × (cost of an
   on-policy step) / (cost of its own step) steps;
4. **arms**, each a ``composer-kd train`` run config from the same cut, data order, seed and schedule shape:

   * ``on_policy``: ``on_policy.fraction: 1`` — the student samples (T 1) and the teacher grades every token;
   * ``off_policy``: ``fraction: 0``, ``source_of_rest: dataset`` — the same loss on the teacher's answers
     (supervised KD);
   * ``labels``: ``fraction: 0``, ``alpha: 1`` — cross-entropy on the teacher's answers (no teacher forward);

   both KD arms use GKD's generalized JSD (β 0.5), T 1, alpha 0;
5. **evaluation** on the held-out prompts: each model's greedy answer and one sampled answer (T 1, seeded by prompt);
   the teacher's mean per-token log-likelihood of those answers (up to and including the first EOS) and the
   per-token reverse KL(student‖teacher) on them, pooled over tokens, with the mean over prompts ± its standard
   error; also answer length and EOS rate. The untrained cut and the teacher itself are evaluated the same way.

Each stage is kept under ``--out`` and a rerun skips finished stages; ``--stage train --arm NAME`` and ``--stage eval
--model NAME`` run one piece (to run them side by side). Prints one JSON object. Single-threaded by default
(``--threads``): on a shared 2-core machine one thread per process gives steadier step times.

    python benchmarks/on_policy_demo.py --teacher smollm2-135m --out on-policy-demo --prompts 96   # docs/on-policy.md
"""

import argparse
import ast
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import sysconfig
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

SYSTEM = 'You are a concise assistant. Answer in one short sentence.'
INSTRUCTION = 'In one sentence, what does this Python function do?'
# name: (on_policy.fraction, alpha)
ARMS: dict[str, tuple[float, float]] = {'on_policy': (1.0, 0.0), 'off_policy': (0.0, 0.0), 'labels': (0.0, 1.0)}
EVAL_STREAM = 7  # the evaluation samples' noise stream (training uses 0 and 1)


# -- 1. prompts ------------------------------------------------------------------------------------------------------
def stdlib_functions(max_lines: int = 6, max_chars: int = 200) -> list[str]:
    """Short functions of the standard library's top-level modules (dedented source, 2..max_lines lines), each
    once, in a fixed pseudo-random order (by hash of the text)."""
    folder = sysconfig.get_paths()['stdlib']
    seen: dict[str, None] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith('.py'):
            continue
        with open(os.path.join(folder, name), encoding='utf-8', errors='replace') as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno is None or not 2 <= node.end_lineno - node.lineno + 1 <= max_lines:
                    continue  # (before get_source_segment, which splits the whole file at every call)
                code = ast.get_source_segment(source, node)
                if code is None or node.decorator_list:
                    continue
                code = textwrap.dedent(' ' * node.col_offset + code)
                if 2 <= code.count('\n') + 1 <= max_lines and len(code) <= max_chars:
                    seen.setdefault(code, None)
    return sorted(seen, key=lambda c: hashlib.sha1(c.encode()).hexdigest())


def chat(code: str) -> list[dict[str, str]]:
    return [{'role': 'system', 'content': SYSTEM},
            {'role': 'user', 'content': f'{INSTRUCTION}\n```python\n{code}\n```'}]


# -- 2. the teacher's answers and the prompt dataset -----------------------------------------------------------------
def _left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask


def make_data(args: argparse.Namespace) -> dict[str, Any]:
    """``records.jsonl`` (rendered prompt + the teacher's greedy answer) and the prompt dataset ``data/``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer_kd.data.prompts import prepare_prompts
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    eos = tokenizer.eos_token_id
    # Only prompts of at most --max-prompt-tokens: every prompt is left-padded to the longest one when sampling.
    codes = [c for c in stdlib_functions()
             if len(tokenizer.apply_chat_template(chat(c), add_generation_prompt=True)) <= args.max_prompt_tokens]
    codes = codes[:args.prompts]
    prompts = [tokenizer.apply_chat_template(chat(c), tokenize=False, add_generation_prompt=True) for c in codes]
    # prepare_prompts tokenizes the rendered text; it must be what the template's own tokenization gives.
    for code, text in zip(codes[:8], prompts):
        assert tokenizer(text)['input_ids'] == tokenizer.apply_chat_template(chat(code), add_generation_prompt=True)
    # Answers are appended as they come (a rerun continues after the last one written).
    partial = args.out / 'records.partial.jsonl'
    done = [json.loads(line) for line in partial.read_text().splitlines()] if partial.is_file() else []
    start = time.perf_counter()
    with open(partial, 'a', encoding='utf-8') as f:
        for i in range(len(done), len(prompts), args.gen_batch):
            chunk = prompts[i:i + args.gen_batch]
            ids, mask = _left_padded([tokenizer(t)['input_ids'] for t in chunk], eos)
            with torch.no_grad():
                out = teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                       do_sample=False, eos_token_id=eos, pad_token_id=eos)
            for text, row in zip(chunk, out[:, ids.shape[1]:].tolist()):
                n = row.index(eos) if eos in row else len(row)
                # The EOS is left out: prepare_prompts appends it, and cuts it off again when the answer was cut.
                record = {'prompt': text, 'response': tokenizer.decode(row[:n]), 'tokens': n + (eos in row),
                          'ended': eos in row}
                f.write(json.dumps(record) + '\n')
                done.append(record)
            f.flush()
            print(f'teacher answers: {len(done)}/{len(prompts)}', flush=True)
    seconds = time.perf_counter() - start
    with open(args.out / 'records.jsonl', 'w', encoding='utf-8') as f:
        for record in done:
            f.write(json.dumps({'prompt': record['prompt'], 'response': record['response']}) + '\n')
    summary = prepare_prompts([str(args.out / 'records.jsonl')], tokenizer, str(args.out / 'data'),
                              max_prompt_len=args.max_prompt_tokens, max_response_len=args.max_new_tokens, overflow='cut',
                              val_fraction=args.val_fraction, overwrite=True)
    return {'prompts': len(done), 'teacher_answers_ended': statistics.mean(r['ended'] for r in done),
            'teacher_answer_tokens_mean': statistics.mean(r['tokens'] for r in done),
            'teacher_generation_s_this_run': seconds, **summary}


# -- 3-4. run configs, equal compute, training -----------------------------------------------------------------------
RECIPE = Path(__file__).resolve().parents[1] / 'yamls' / 'smollm2-135m-on-policy.yaml'


def _cut() -> dict[str, Any]:
    """The recipe's ``model.student.from_teacher`` (which blocks the student keeps)."""
    from composer_kd.config.loading import read_yaml
    return dict(read_yaml(str(RECIPE))['model']['student']['from_teacher'])


def run_config(args: argparse.Namespace, arm: str, steps: int) -> dict[str, Any]:
    """The run config of one arm: ``yamls/smollm2-135m-on-policy.yaml`` (the ``on_policy`` arm) with the overrides
    a shell would give ``composer-kd train``."""
    from composer_kd.config.run_config import load_config
    fraction, alpha = ARMS[arm]
    return load_config(str(RECIPE), [
        f'variables.teacher={args.teacher}', f'variables.prompts={args.out / "data"}',
        f'variables.max_new_tokens={args.max_new_tokens}', f'variables.steps={steps}', f'variables.lr={args.lr}',
        f'variables.run_name={arm}', f'model.distillation.on_policy.fraction={fraction}',
        f'model.distillation.alpha={alpha}', f'scheduler.t_warmup={max(1, steps // 10)}ba',
        f'global_train_batch_size={args.batch}', f'device_train_microbatch_size={args.batch}',
        f'save_folder={args.out / arm / "checkpoints"}', f'save_interval={steps}ba', 'loggers={inmemory: {}}',
        'log_to_console=false'])


class _ArmStep:
    """One training step of a built run outside ``fit``: the prompt batch rewritten by the run's own
    ``OnPolicyDistillation.transform`` (generation included on the on-policy arm), forward, loss, backward,
    clipping and the optimizer step."""

    def __init__(self, trainer: Any) -> None:
        from composer_kd.callbacks import OnPolicyDistillation
        state = trainer.state
        self.model, self.optimizer = state.model, state.optimizers[0]
        self.rollout = next(c for c in state.callbacks if isinstance(c, OnPolicyDistillation))
        self.rollout.fit_start(state, trainer.logger)
        self.batches = itertools.cycle(state.train_dataloader)
        self.model.train()

    def __call__(self) -> None:
        batch = self.rollout.transform(next(self.batches))
        self.model.loss(self.model(batch), batch)['total'].backward()
        torch.nn.utils.clip_grad_norm_(self.model.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def step_costs(args: argparse.Namespace) -> dict[str, Any]:
    """One step of each arm, interleaved (``paired_step_costs``); ``on_policy`` is the reference."""
    from composer_kd.quickstart.step_costs import paired_step_costs
    from composer_kd.run.train import build_trainer
    trainers = {arm: build_trainer({**run_config(args, arm, 10**6), 'save_folder': None, 'loggers': None})
                for arm in ARMS}
    costs = paired_step_costs({arm: _ArmStep(t) for arm, t in trainers.items()}, rounds=args.cost_rounds,
                              warmup=1)
    for trainer in trainers.values():
        trainer.close()
    steps = {arm: max(1, round(args.on_policy_steps / costs['ratio'][arm])) for arm in ARMS}
    return {**costs, 'threads': torch.get_num_threads(), 'steps': steps,
            'note': 'the on-policy step was timed on the untrained cut, whose continuations run to the budget'}


def _step_timer() -> Any:
    """A callback timing each batch from BEFORE_DATALOADER (the prompt batch's rewrite, generation included, comes
    after it) to BATCH_END."""
    from composer.core import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def before_dataloader(self, state: Any, logger: Any) -> None:
            self._start = time.perf_counter()

        def batch_end(self, state: Any, logger: Any) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def train_arm(args: argparse.Namespace, arm: str, steps: int) -> dict[str, Any]:
    """Trains one arm (the public ``build_trainer`` + ``fit``, a step timer added) and exports the student."""
    import shutil

    from composer.loggers import InMemoryLogger

    from composer_kd.run.export import export_student
    from composer_kd.run.train import build_trainer
    trainer = build_trainer(run_config(args, arm, steps))
    timer = _step_timer()
    trainer.state.callbacks.append(timer)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    series = {k: [float(v) for _, v in memory.data[k]] for k in memory.data
              if k.startswith(('rollout/', 'loss/train/'))}
    trainer.close()
    export_student(str(args.out / arm / 'checkpoints' / 'latest-rank0.pt'), str(args.out / arm / 'model'),
                   overwrite=True)
    shutil.rmtree(args.out / arm / 'checkpoints')
    gen = series.get('rollout/generation_seconds', [])
    return {'steps': steps, 'wall_s': wall, 'step_s_median': statistics.median(timer.seconds),
            'step_s': timer.seconds, 'generation_s_total': sum(gen),
            'generated_length_mean': statistics.mean(series['rollout/generated_length_mean']),
            'series': series, 'config': run_config(args, arm, steps)}


# -- 5. evaluation ---------------------------------------------------------------------------------------------------
def _val_batches(args: argparse.Namespace, pad: int, size: int) -> Iterator[dict[str, torch.Tensor]]:
    from composer_kd.data.prompts import PromptDataset, collate_prompts, read_prompts_info
    width = read_prompts_info(str(args.out / 'data'))['prompt_width']
    data = PromptDataset(local=str(args.out / 'data'), split='val', shuffle=False)
    samples = [data[i] for i in range(len(data))][:args.eval_prompts]
    for i in range(0, len(samples), size):
        yield collate_prompts(samples[i:i + size], pad, width)


def _answers(model: torch.nn.Module, batch: dict[str, torch.Tensor], how: str, max_new_tokens: int, eos: int,
             seed: int) -> torch.Tensor:
    """``(B, N)`` the model's greedy or sampled (T 1, noise keyed by seed and sample id) continuations."""
    from transformers import GenerationConfig

    from composer_kd.model.generation import generate_continuations
    from composer_kd.model.sampling import SeededGumbelSampler, row_keys
    if how == 'sampled':
        sampler = SeededGumbelSampler(row_keys(seed, 0, batch['sample_id'], EVAL_STREAM), batch['prompt_ids'].shape[1])
        tokens, _ = generate_continuations(model, batch['prompt_ids'], batch['prompt_mask'], sampler, max_new_tokens,
                                           [eos], eos, world_size=1)
        return tokens
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                              temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(input_ids=batch['prompt_ids'], attention_mask=batch['prompt_mask'],
                             generation_config=config)
    return out[:, batch['prompt_ids'].shape[1]:]


def score(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor],
          tokens: torch.Tensor, eos: int) -> list[dict[str, float]]:
    """Per answer: tokens scored (up to and including the first EOS), whether it ended, the sums over its tokens of
    the teacher's log-likelihood and of KL(student‖teacher) at each position."""
    from composer_kd.data.rollout_batches import assemble_rollout_batch, continuation_lengths
    lengths, ended = continuation_lengths(tokens, [eos])
    rows = assemble_rollout_batch(batch['prompt_ids'], batch['prompt_mask'], tokens, lengths, eos)
    with torch.no_grad():
        inputs = {'input_ids': rows['input_ids'], 'attention_mask': rows['attention_mask']}
        logp = torch.log_softmax(teacher(**inputs).logits.float(), dim=-1)[:, :-1]
        logq = torch.log_softmax(student(**inputs).logits.float(), dim=-1)[:, :-1]
    labels = rows['labels'][:, 1:]
    scored = labels != -100
    taken = logp.gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    reverse_kl = (logq.exp() * (logq - logp)).sum(-1)
    return [{'tokens': int(scored[b].sum()), 'ended': bool(ended[b]),
             'teacher_logprob_sum': float(taken[b][scored[b]].sum()),
             'reverse_kl_sum': float(reverse_kl[b][scored[b]].sum())} for b in range(tokens.shape[0])]


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    tokens = sum(r['tokens'] for r in rows)
    out: dict[str, float] = {'answers': len(rows), 'length_mean': tokens / len(rows),
                             'eos_rate': sum(r['ended'] for r in rows) / len(rows)}
    for name in ('teacher_logprob', 'reverse_kl'):
        per_answer = [r[f'{name}_sum'] / r['tokens'] for r in rows if r['tokens']]
        out[f'{name}_per_token'] = sum(r[f'{name}_sum'] for r in rows) / max(tokens, 1)  # pooled over tokens
        out[f'{name}_answer_mean'] = statistics.mean(per_answer)
        out[f'{name}_answer_se'] = statistics.stdev(per_answer) / math.sqrt(len(per_answer))
    return out


def evaluate(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Greedy and sampled answers of one model on the held-out prompts, scored against the teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer_kd.model.layer_pruning import cut_model, select_layers
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    eos = tokenizer.eos_token_id
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    if name == 'teacher':
        student = teacher
    elif name == 'untrained':
        student = cut_model(teacher, select_layers(teacher.config.num_hidden_layers, **_cut())).eval()
    else:
        student = AutoModelForCausalLM.from_pretrained(args.out / name / 'model').eval()
    results: dict[str, Any] = {}
    examples = []
    start = time.perf_counter()
    for how in ('greedy', 'sampled'):
        rows = []
        for batch in _val_batches(args, eos, args.eval_batch):
            tokens = _answers(student, batch, how, args.max_new_tokens, eos, seed=17)
            rows += score(student, teacher, batch, tokens, eos)
            if how == 'greedy' and len(examples) < 3:
                examples += [tokenizer.decode(t[:int(r['tokens'])]) for t, r in zip(tokens, rows[-len(tokens):])]
        results[how] = _summary(rows)
    return {**results, 'examples': examples[:3], 'seconds': time.perf_counter() - start}


# -- stages ----------------------------------------------------------------------------------------------------------
def _stage(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stage's JSON, made once (a rerun reads it)."""
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def table(evals: dict[str, Any], costs: dict[str, Any], runs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, result in evals.items():
        row: dict[str, Any] = {'model': name, 'steps': costs['steps'].get(name, 0) if name in ARMS else None}
        if name in runs:
            row['train_wall_s'] = round(runs[name]['wall_s'], 1)
        for how in ('greedy', 'sampled'):
            r = result[how]
            row[how] = {'teacher_logprob_per_token': round(r['teacher_logprob_per_token'], 3),
                        'teacher_logprob_answer_mean_se': [round(r['teacher_logprob_answer_mean'], 3),
                                                           round(r['teacher_logprob_answer_se'], 3)],
                        'reverse_kl_per_token': round(r['reverse_kl_per_token'], 3),
                        'length_mean': round(r['length_mean'], 1), 'eos_rate': round(r['eos_rate'], 3)}
        rows.append(row)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--teacher', type=Path, required=True, help='composer-kd make-example-teacher --out DIR')
    parser.add_argument('--out', type=Path, required=True, help='working folder (stages are kept and skipped)')
    parser.add_argument('--stage', choices=['data', 'costs', 'train', 'eval', 'report', 'all'], default='all')
    parser.add_argument('--arm', choices=list(ARMS), help='--stage train: this arm only')
    parser.add_argument('--model', help='--stage eval: this model only (teacher, untrained or an arm)')
    parser.add_argument('--prompts', type=int, default=96, help='prompts made (default 96: 75 train, 21 held out)')
    parser.add_argument('--val-fraction', type=float, default=0.2, help='share of the prompts held out')
    parser.add_argument('--max-prompt-tokens', type=int, default=96, help='longer prompts are not used')
    parser.add_argument('--max-new-tokens', type=int, default=48)
    parser.add_argument('--gen-batch', type=int, default=32, help='prompts per teacher generate call')
    parser.add_argument('--batch', type=int, default=4, help='prompts per training step')
    parser.add_argument('--lr', type=float, default=3e-4)
    parser.add_argument('--on-policy-steps', type=int, default=40, help='the budget, in on-policy steps')
    parser.add_argument('--cost-rounds', type=int, default=5)
    parser.add_argument('--eval-prompts', type=int, default=32)
    parser.add_argument('--eval-batch', type=int, default=8)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {args.stage} if args.stage != 'all' else {'data', 'costs', 'train', 'eval', 'report'}
    result: dict[str, Any] = {}
    if stages & {'data', 'costs', 'train', 'report'}:
        result['data'] = _stage(args.out / 'data.json', lambda: make_data(args))
    if stages & {'costs', 'train', 'report'}:
        result['costs'] = _stage(args.out / 'costs.json', lambda: step_costs(args))
    runs: dict[str, Any] = {}
    if stages & {'train', 'report'}:
        for arm in ([args.arm] if args.arm else list(ARMS)):
            if 'train' in stages or (args.out / arm / 'run.json').is_file():
                runs[arm] = _stage(args.out / arm / 'run.json',
                                   lambda arm=arm: train_arm(args, arm, result['costs']['steps'][arm]))
    evals: dict[str, Any] = {}
    if stages & {'eval', 'report'}:
        for name in ([args.model] if args.model else ['teacher', 'untrained', *ARMS]):
            if 'eval' in stages or (args.out / 'eval' / f'{name}.json').is_file():
                evals[name] = _stage(args.out / 'eval' / f'{name}.json', lambda name=name: evaluate(args, name))
    if 'report' in stages:
        result = {
            'machine': {'platform': platform.platform(), 'processor': platform.processor(),
                        'cpus': os.cpu_count(), 'threads': args.threads, 'torch': torch.__version__},
            'date': datetime.date.today().isoformat(),
            'settings': {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            'student_cut': _cut(), 'data': result['data'], 'costs': result['costs'],
            'runs': {arm: {k: v for k, v in run.items() if k not in ('series', 'step_s', 'config')}
                     for arm, run in runs.items()},
            'table': table(evals, result['costs'], runs),
            'examples': {name: e.get('examples') for name, e in evals.items()},
        }
    else:
        result.update({'runs': {a: {k: v for k, v in r.items() if k not in ('series', 'step_s', 'config')}
                                for a, r in runs.items()}, 'evals': evals})
    print(json.dumps(result, indent=1))
    return result


if __name__ == '__main__':
    main()
