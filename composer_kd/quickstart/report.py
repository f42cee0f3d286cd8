"""The quickstart's report: held-out metrics of every model, a table, ``results.json`` and a plot.

Compute is accounted in *label-only steps*: what one training step of the student on labels alone costs, by
the paired measurement of the ``step_costs`` stage. A distillation step costs ``ratio`` of them (the online
teacher's forward, or the offline top-k loss and data); the one-time precompute costs ``ratio['precompute']``
per batch of the teacher's pass over the data. Both the per-run view (after the precompute) and the
amortised one (the precompute shared by N runs) are reported.
"""

import json
import math
from pathlib import Path
from typing import Any, Mapping

from composer_kd.run.evaluate import evaluate_student

__all__ = ['write_report', 'format_table']

EVAL_SAMPLES = 1024  # held-out samples per model (the same first ones for every model)
ROWS = (
    ('teacher', 'teacher'),
    ('baseline', 'student, labels only (same steps)'),
    ('baseline_equal_time', 'student, labels only (= online cost)'),
    ('distilled', 'student, distilled online'),
    ('baseline_equal_time_offline', 'student, labels only (= offline cost)'),
    ('distilled_offline', 'student, distilled offline (top-k)'),
)
AMORTISED_OVER = (1, 3, 10)  # runs sharing one precompute


def format_table(results: Mapping[str, Any]) -> str:
    """The terminal table of ``results`` (as written to ``results.json``)."""
    lines = [f'{"model":<40} {"eval CE":>8} {"ppl":>7} {"top-1 agr.":>10} {"steps":>6} {"cost":>7} {"wall s":>7}']
    for key, title in ROWS:
        r = results['models'][key]
        agreement = '' if r.get('top1_agreement') is None else f'{r["top1_agreement"]:.3f}'
        cost = '' if r.get('cost_label_steps') is None else f'{r["cost_label_steps"]:.0f}'
        lines.append(f'{title:<40} {r["eval_ce"]:8.4f} {r["eval_ppl"]:7.2f} {agreement:>10} {r["steps"]:6d} '
                     f'{cost:>7} {r["wall_s"]:7.1f}')
    gaps, ratio = results['gap_closed'], results['step_costs']['ratio']
    lines.append(f'cost: in label-only steps, from the paired measurement (a step costs {ratio["online"]:.2f} online, '
                 f'{ratio["offline"]:.2f} offline)')
    lines.append(f'online distillation closes {gaps["online"]["vs_baseline"]:.0%} of the baseline→teacher CE gap '
                 f'(same steps) and {gaps["online"]["vs_equal_cost"]:.0%} (same cost)')
    lines.append(f'offline distillation closes {gaps["offline"]["vs_baseline"]:.0%} (same steps) and '
                 f'{gaps["offline"]["vs_equal_cost"]:.0%} (same cost, after the one-time precompute)')
    pre = results['precompute']
    lines.append(f'the precompute (k={pre["top_k"]}, {pre["logprobs"]}, {pre["bytes_per_token"]:.0f} bytes/token) cost '
                 f'{pre["cost_label_steps"]:.0f} label-only steps once; shared by N runs, an offline run costs '
                 + ', '.join(f'{v:.0f} (N={n})' for n, v in pre['offline_run_cost_amortised'].items())
                 + f' vs {results["models"]["distilled"]["cost_label_steps"]:.0f} online; it pays off from '
                 f'N = {pre["break_even_runs"]}')
    return '\n'.join(lines)


def _plot(out: Path, records: Mapping[str, Any], teacher_ce: float) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for key, title in ROWS[1:]:
        curve = records[key]['eval_curve']
        if curve:
            by_step.plot([c[0] for c in curve], [c[-1] for c in curve], marker='.', label=title)
            by_time.plot([c[1] for c in curve], [c[-1] for c in curve], marker='.', label=title)
    for ax in (by_step, by_time):
        # The curves are the runs' own evals (eval_subset_num_batches of the recipes); the line is the report's.
        ax.axhline(teacher_ce, color='gray', linestyle='--', linewidth=1,
                   label=f'teacher, final ({EVAL_SAMPLES} samples)')
    by_step.set_xlabel('training batch')
    by_step.set_ylabel('eval CE in training, nats/token (recipe eval subset)')
    by_time.set_xlabel('wall-clock seconds of the run (this machine, as it was during that stage)')
    by_step.set_title('held-out cross-entropy by step')
    by_time.set_title('by wall-clock time (the precompute, done once, not included)')
    by_time.legend(fontsize=8)
    fig.suptitle('composer-kd quickstart')
    fig.tight_layout()
    fig.savefig(out / 'eval_curves.png', dpi=120)
    plt.close(fig)


def _precompute_accounting(records: Mapping[str, Any], student_steps: int) -> dict[str, Any]:
    """The one-time precompute in label-only steps, and what an offline run costs when N runs share it."""
    topk, costs = records['teacher_topk'], records['step_costs']
    samples = sum(split['samples'] for split in topk['splits'].values())
    tokens = sum(split['tokens'] for split in topk['splits'].values())
    once = samples / costs['batch_size'] * costs['ratio']['precompute']
    offline, online = student_steps * costs['ratio']['offline'], student_steps * costs['ratio']['online']
    saved = online - offline  # per run
    return {
        'top_k': topk['top_k'],
        'logprobs': topk['logprobs'],
        'samples': samples,
        'tokens': tokens,
        'bytes': sum(split['bytes'] for split in topk['splits'].values()),
        'bytes_per_token': sum(split['bytes'] for split in topk['splits'].values()) / tokens,
        'wall_s': topk['wall_s'],
        'cost_label_steps': once,
        'offline_run_cost_amortised': {n: offline + once / n for n in AMORTISED_OVER},
        'break_even_runs': math.floor(once / saved) + 1 if saved > 0 else None,
    }


def write_report(shared: Path, out: Path, records: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluates every model on the first ``EVAL_SAMPLES`` val samples; writes ``results.json`` and
    ``eval_curves.png`` into ``out`` (the students' stages); prints the table; returns the results.

    Args:
        shared (Path): the folder of the stages every setting shares (tokenizer, data, teacher).
        out (Path): the folder of this setting's stages.
        records (Mapping): each stage's record.
        settings (Mapping): the run's settings, recorded in ``results.json``.
    """
    tokenizer, data = str(shared / 'tokenizer' / 'tokenizer'), str(shared / 'data' / 'mds')
    teacher = str(shared / 'teacher' / 'model')
    ratio = records['step_costs']['ratio']
    costs = {'baseline': 1.0, 'baseline_equal_time': 1.0, 'baseline_equal_time_offline': 1.0,
             'distilled': ratio['online'], 'distilled_offline': ratio['offline']}
    models: dict[str, Any] = {}
    for key, _ in ROWS:
        folder = (shared if key == 'teacher' else out) / key / 'model'
        metrics = evaluate_student(str(folder), tokenizer, data, settings['max_seq_len'],
                                   teacher_dir=None if key == 'teacher' else teacher, max_samples=EVAL_SAMPLES)
        record = records[key]
        models[key] = {
            'eval_ce': metrics['LanguageCrossEntropy'],
            'eval_ppl': metrics['LanguagePerplexity'],
            'top1_agreement': metrics.get('TeacherTop1Agreement'),
            'kl_to_teacher': metrics.get('TeacherDivergenceLoss'),
            'steps': record['steps'],
            'cost_label_steps': record['steps'] * costs[key] if key in costs else None,
            'wall_s': record['wall_s'],
            'tokens_per_s': record['tokens_per_s'],
        }
    ce = {k: m['eval_ce'] for k, m in models.items()}

    def closed(student: str, baseline: str) -> float:
        gap = ce[baseline] - ce['teacher']
        return (ce[baseline] - ce[student]) / gap if gap > 0 else float('nan')

    results = {
        'settings': dict(settings),
        'models': models,
        'gap_closed': {
            'online': {'vs_baseline': closed('distilled', 'baseline'),
                       'vs_equal_cost': closed('distilled', 'baseline_equal_time')},
            'offline': {'vs_baseline': closed('distilled_offline', 'baseline'),
                        'vs_equal_cost': closed('distilled_offline', 'baseline_equal_time_offline')},
        },
        'step_costs': {k: v for k, v in records['step_costs'].items()},
        'equal_cost_steps': {'how': 'round(student steps × paired step-cost ratio); see step_costs',
                             'online': models['baseline_equal_time']['steps'],
                             'offline': models['baseline_equal_time_offline']['steps']},
        'precompute': _precompute_accounting(records, settings['student_steps']),
        'distilled_student': str(out / 'distilled' / 'model'),
        'distilled_offline_student': str(out / 'distilled_offline' / 'model'),
    }
    (out / 'results.json').write_text(json.dumps(results, indent=1))
    _plot(out, records, ce['teacher'])
    print(format_table(results))
    print(f'results: {out / "results.json"}; plot: {out / "eval_curves.png"}; distilled students (HF folders): '
          f'{results["distilled_student"]}, {results["distilled_offline_student"]}')
    return results
