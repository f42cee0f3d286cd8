"""On-policy distillation from a checked run config: the ``OnPolicyDistillation`` callback, the prompt loaders
whose batches it rewrites, and the checks that need the prompt data's record or the built student."""

import functools
import logging
from typing import Any, Mapping, Optional

from composer.core import DataSpec
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from composer_kd.callbacks.on_policy import OnPolicyDistillation
from composer_kd.config.run_rules import on_policy
from composer_kd.data.prompts import build_prompt_dataloader, read_prompts_info
from composer_kd.data.rollout_batches import supervised_batch
from composer_kd.data.tokens import count_tokens
from composer_kd.errors import ConfigError

__all__ = ['build_on_policy', 'check_student_fits', 'prompt_dataloader']

log = logging.getLogger(__name__)

_CALLBACK_KEYS = ('fraction', 'source_of_rest', 'max_new_tokens', 'temperature', 'top_k', 'top_p',
                  'generate_batch_size', 'sample_log')


def build_on_policy(cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                    pad_token_id: int) -> Optional[OnPolicyDistillation]:
    """The callback of ``model.distillation.on_policy`` (None when it is off), its EOS ids from the config or the
    tokenizer (``check_student_fits`` adds the student's own)."""
    settings = on_policy(cfg)
    if settings is None:
        return None
    given = settings['eos_token_ids']
    eos = [given] if isinstance(given, int) else list(given or [])
    if not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    if settings['top_k'] or settings['top_p'] < 1.0:
        log.warning('model.distillation.on_policy: sampling with top_k=%s, top_p=%s, while the loss compares the full '
                    'distributions', settings['top_k'], settings['top_p'])
    if settings['allow_temperature_mismatch']:
        log.warning('model.distillation.on_policy: sampling at temperature %s, the loss at %s',
                    settings['temperature'], (cfg['model'].get('distillation') or {}).get('temperature', 1.0))
    return OnPolicyDistillation(pad_token_id, eos, cfg.get('seed', 17), **{k: settings[k] for k in _CALLBACK_KEYS})


def prompt_dataloader(cfg: Mapping[str, Any], section: str, batch_size: int, pad_token_id: int, vocab_size: int,
                      rollout: OnPolicyDistillation) -> DataSpec:
    """The ``DataSpec`` of a ``prompts`` loader: training batches are the rollout's; evaluation batches are prompt
    + dataset response (which every prompt then needs)."""
    loader_cfg = {k: v for k, v in cfg[section].items() if k != 'name'}
    dataset = loader_cfg.pop('dataset')
    info = read_prompts_info(dataset.get('local'), dataset.get('remote'))
    split = dataset.get('split') or 'train'
    counts = info['summary'].get(split, {})
    needs_responses = section == 'eval_loader' or (rollout.fraction < 1.0 and rollout.source_of_rest == 'dataset')
    if needs_responses and counts.get('with_response', 0) < counts.get('prompts', 0):
        what = 'evaluation scores the dataset\'s responses' if section == 'eval_loader' else \
            'source_of_rest: dataset trains the other steps on them'
        raise ConfigError(f'{section}.dataset: {counts.get("prompts", 0) - counts.get("with_response", 0)} prompts of '
                          f'split {split!r} have no response, and {what}')
    transform = rollout.transform if section == 'train_loader' else functools.partial(
        supervised_batch, eos_ids=rollout.eos_ids, pad_token_id=pad_token_id)
    return build_prompt_dataloader(dataset, batch_size, pad_token_id, transform, count_tokens, vocab_size=vocab_size,
                                   key=section, **loader_cfg)


def check_student_fits(cfg: Mapping[str, Any], rollout: OnPolicyDistillation, student: PreTrainedModel) -> None:
    """Adds the student's own EOS ids to the rollout's, and refuses prompts and a generation budget longer than the
    student's positions."""
    configured = student.generation_config.eos_token_id if student.generation_config is not None else None
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if on_policy(cfg)['eos_token_ids'] is None:
        rollout.eos_ids = sorted(set(rollout.eos_ids) | set(ids))
    if not rollout.eos_ids:
        raise ConfigError('model.distillation.on_policy.eos_token_ids: the tokenizer and the student name no EOS '
                          'token; give the ids that end a continuation')
    dataset = cfg['train_loader']['dataset']
    width = read_prompts_info(dataset.get('local'), dataset.get('remote'))['prompt_width']
    positions = getattr(student.config, 'max_position_embeddings', None) or getattr(student.config, 'n_positions',
                                                                                  None)
    if positions is not None and width + rollout.max_new_tokens > positions:
        raise ConfigError(f'model.distillation.on_policy.max_new_tokens={rollout.max_new_tokens}: prompts of up to '
                          f'{width} tokens plus the continuation exceed the student\'s {positions} positions')
