"""Checks of a run that trains from a precomputed teacher (``model.teacher: {precomputed: true}``): the data's
``teacher_topk.json`` against the config and the tokenizer, before any model or sample is loaded."""

import logging
import os
from typing import Any, Mapping, Optional

from transformers import PreTrainedTokenizerBase

from composer_kd.data.teacher_topk import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    read_metadata,
    same_teacher,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from composer_kd.config.paths import LocalPaths, looks_local
from composer_kd.errors import ConfigError

__all__ = ['check_precomputed_data', 'check_precomputed_tokenizer', 'distillation_temperature']

log = logging.getLogger(__name__)


def distillation_temperature(cfg: Mapping[str, Any]) -> float:
    return float((cfg['model'].get('distillation') or {}).get('temperature', 1.0))


def _where(dataset: Mapping[str, Any]) -> str:
    return f"{dataset.get('remote') or dataset.get('local')}/{dataset.get('split') or ''}".rstrip('/')


def _read(key: str, dataset: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    try:
        meta = read_metadata(dataset.get('local'), dataset.get('remote'), dataset.get('split'),
                             timeout=float(dataset.get('download_timeout', 60)))
    except ValueError as e:  # unparsable JSON
        raise ConfigError(f'{key}: {METADATA_FILE} at {_where(dataset)} is not valid JSON ({e})') from e
    if meta is not None and (meta.get('format') != FORMAT_NAME or meta.get('version') != FORMAT_VERSION):
        raise ConfigError(f'{key}: {METADATA_FILE} at {_where(dataset)} is not a composer-kd teacher top-k record '
                          f'of version {FORMAT_VERSION}')
    return meta


def _check_against(key: str, dataset: Mapping[str, Any], meta: Mapping[str, Any], temperature: float) -> None:
    recorded = meta['max_seq_len']
    if dataset['max_seq_len'] > recorded:
        raise ConfigError(f'{key}.max_seq_len={dataset["max_seq_len"]} is longer than the {recorded} tokens the '
                          f'teacher was precomputed for at {_where(dataset)}')
    if not any(abs(temperature - t) < 1e-9 for t in meta['temperatures']):
        raise ConfigError(f'model.distillation.temperature={temperature:g}: the precomputed teacher at '
                          f'{_where(dataset)} records temperatures {meta["temperatures"]}; add it to '
                          'precompute.temperatures and rerun precompute-teacher, or use one of them')


def _check_teacher_source(teacher: Mapping[str, Any], dataset: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """A ``model.teacher`` that still names its model (say, a recipe with ``model.teacher.precomputed=true`` added
    on the command line) must name the one the data was precomputed from: the same weights if it is a local
    folder (wherever it lies now), the same id otherwise. A folder that is gone is not checked."""
    source = teacher.get('pretrained_model_name_or_path')
    if source is None or (looks_local(source) and not os.path.isdir(os.path.expanduser(source))):
        return
    named = {'source': source, 'fingerprint': teacher_fingerprint(source)}
    if not same_teacher(named, meta['teacher']):
        raise ConfigError(f'model.teacher.pretrained_model_name_or_path={source!r}, but the teacher at '
                          f'{_where(dataset)} was precomputed from another model ({meta["teacher"]["source"]!r})')


def _elsewhere(dataset: Mapping[str, Any], paths: Optional[LocalPaths]) -> bool:
    """A local-only dataset that is not on this machine, with ``--paths-elsewhere``: not checked here."""
    return (paths is not None and paths.elsewhere and not dataset.get('remote')
            and not os.path.isdir(os.path.join(dataset.get('local') or '', dataset.get('split') or '')))


def check_precomputed_data(cfg: Mapping[str, Any],
                           paths: Optional[LocalPaths] = None) -> tuple[Optional[dict[str, Any]], Optional[dict[str,
                                                                                                             Any]]]:
    """Reads and checks the precomputed teacher of the train (and eval) data; returns their metadata (None for a
    split that ``paths`` says lives elsewhere).

    Eval data without a precomputed teacher is allowed: the teacher metrics are skipped with a warning (and an
    early stopper that monitors one is refused).

    Raises:
        ConfigError: train data without a teacher, a ``max_seq_len`` longer than recorded, an unrecorded
            temperature, eval data precomputed by another teacher, or a monitor on a skipped metric.
    """
    temperature = distillation_temperature(cfg)
    train = cfg['train_loader']['dataset']
    if _elsewhere(train, paths):
        return None, None
    train_meta = _read('train_loader.dataset', train)
    if train_meta is None:
        raise ConfigError(f'train_loader.dataset: no precomputed teacher at {_where(train)} (no {METADATA_FILE} '
                          'beside index.json); write one with `composer-kd precompute-teacher`, or give '
                          'model.teacher a model')
    _check_against('train_loader.dataset', train, train_meta, temperature)
    _check_teacher_source(cfg['model']['teacher'], train, train_meta)
    if cfg.get('eval_loader') is None:
        return train_meta, None
    evaluation = cfg['eval_loader']['dataset']
    if _elsewhere(evaluation, paths):
        return train_meta, None
    eval_meta = _read('eval_loader.dataset', evaluation)
    if eval_meta is None:
        monitored = [name for name, kwargs in (cfg.get('callbacks') or {}).items()
                     if str((kwargs or {}).get('monitor', '')).startswith('Teacher')]
        if monitored:
            raise ConfigError(f'callbacks.{monitored[0]}.monitor: the eval data at {_where(evaluation)} has no '
                              'precomputed teacher, so the teacher metrics are not computed; precompute it too')
        log.warning('eval_loader.dataset at %s has no precomputed teacher: TeacherDivergenceLoss and '
                    'TeacherTop1Agreement are skipped (precompute-teacher the eval split to get them)',
                    _where(evaluation))
        return train_meta, None
    _check_against('eval_loader.dataset', evaluation, eval_meta, temperature)
    if not same_teacher(eval_meta['teacher'], train_meta['teacher']):
        raise ConfigError(f'eval_loader.dataset: the teacher precomputed at {_where(evaluation)} is not the one at '
                          f'{_where(train)} ({eval_meta["teacher"]["source"]} vs {train_meta["teacher"]["source"]})')
    return train_meta, eval_meta


def check_precomputed_tokenizer(key: str, meta: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuses a run tokenizer whose vocabulary is not the one the teacher was precomputed with."""
    recorded = meta['tokenizer']
    if len(tokenizer) != meta['vocab_size'] or tokenizer_fingerprint(tokenizer) != recorded['fingerprint']:
        raise ConfigError(f'tokenizer.name: its vocabulary ({len(tokenizer)} tokens) is not the one the teacher in '
                          f'{key} was precomputed with ({recorded["name"]}, {meta["vocab_size"]} tokens); the ids '
                          'would mean other tokens')
