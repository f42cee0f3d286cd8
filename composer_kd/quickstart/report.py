"""The quickstart's report: held-out metrics of every model, a table, ``results.json`` and a plot."""

import json
from pathlib import Path
from typing import Any

from composer_kd.run.evaluate import evaluate_student

__all__ = ['write_report', 'format_table']

EVAL_SAMPLES = 1024  # held-out samples per model (the same first ones for every model)
ROWS = (
    ('teacher', 'teacher'),
    ('baseline', 'student, labels only (same steps)'),
    ('baseline_equal_time', 'student, labels only (same time)'),
    ('distilled', 'student, distilled'),
)


def format_table(results: dict[str, Any]) -> str:
    """The terminal table of ``results`` (as written to ``results.json``)."""
    lines = [f'{"model":<34} {"eval CE":>8} {"ppl":>8} {"top-1 agr.":>10} {"steps":>6} {"wall s":>7} {"tok/s":>8}']
    for key, title in ROWS:
        r = results['models'][key]
        agreement = '' if r.get('top1_agreement') is None else f'{r["top1_agreement"]:.3f}'
        lines.append(f'{title:<34} {r["eval_ce"]:8.4f} {r["eval_ppl"]:8.2f} {agreement:>10} {r["steps"]:6d} '
                     f'{r["wall_s"]:7.1f} {r["tokens_per_s"]:8.0f}')
    gaps = results['gap_closed']
    lines.append(f'distillation closes {gaps["vs_baseline"]:.0%} of the baseline→teacher CE gap '
                 f'(same steps) and {gaps["vs_baseline_equal_time"]:.0%} (same wall time)')
    return '\n'.join(lines)


def _plot(out: Path, records: dict[str, Any], teacher_ce: float) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, title in ROWS:
        curve = records[key]['eval_curve']
        if curve:
            ax.plot([b for b, _ in curve], [v for _, v in curve], marker='.', label=title)
    # The curves are the runs' own evals (eval_subset_num_batches of the recipes); the line is the report's.
    ax.axhline(teacher_ce, color='gray', linestyle='--', linewidth=1,
               label=f'teacher, final ({EVAL_SAMPLES} samples)')
    ax.set_xlabel('training batch')
    ax.set_ylabel('eval CE in training, nats/token (recipe eval subset)')
    ax.set_title('composer-kd quickstart: held-out cross-entropy')
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / 'eval_curves.png', dpi=120)
    plt.close(fig)


def write_report(out: Path, records: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Evaluates every model on the first ``EVAL_SAMPLES`` val samples; writes ``results.json`` and
    ``eval_curves.png``; prints the table; returns the results."""
    tokenizer, data = str(out / 'tokenizer' / 'tokenizer'), str(out / 'data' / 'mds')
    teacher = str(out / 'teacher' / 'model')
    models: dict[str, Any] = {}
    for key, _ in ROWS:
        metrics = evaluate_student(str(out / key / 'model'), tokenizer, data, settings['max_seq_len'],
                                   teacher_dir=None if key == 'teacher' else teacher, max_samples=EVAL_SAMPLES)
        record = records[key]
        models[key] = {
            'eval_ce': metrics['LanguageCrossEntropy'],
            'eval_ppl': metrics['LanguagePerplexity'],
            'top1_agreement': metrics.get('TeacherTop1Agreement'),
            'kl_to_teacher': metrics.get('TeacherDivergenceLoss'),
            'steps': record['steps'],
            'wall_s': record['wall_s'],
            'tokens_per_s': record['tokens_per_s'],
        }
    ce = {k: m['eval_ce'] for k, m in models.items()}

    def closed(baseline: str) -> float:
        gap = ce[baseline] - ce['teacher']
        return (ce[baseline] - ce['distilled']) / gap if gap > 0 else float('nan')

    results = {
        'settings': settings,
        'models': models,
        'gap_closed': {'vs_baseline': closed('baseline'), 'vs_baseline_equal_time': closed('baseline_equal_time')},
        'distilled_student': str(out / 'distilled' / 'model'),
    }
    (out / 'results.json').write_text(json.dumps(results, indent=1))
    _plot(out, records, ce['teacher'])
    print(format_table(results))
    print(f'results: {out / "results.json"}; plot: {out / "eval_curves.png"}; distilled student (HF folder): '
          f'{results["distilled_student"]}')
    return results
