"""What a ``precompute-teacher`` run records about itself: the plan a rerun must match, and the metadata of a
finished split (``teacher_topk.json``)."""

import hashlib
import importlib.metadata
import json
import os
from typing import Any, Mapping, Optional, Sequence

from composer_kd.data.teacher_topk import (
    FORMAT_NAME,
    FORMAT_VERSION,
    read_metadata,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from composer_kd.data.topk_parts import PLAN_FILE, read_json
from composer_kd.errors import ConfigError
from composer_kd.model.vocab import embedding_rows
from composer_kd.run.checks import check_ensemble, ensemble_mode
from composer_kd.run.config import teacher_entries
from composer_kd.run.precompute_settings import PrecomputeSettings

__all__ = ['check_plan', 'metadata', 'plan', 'summary']

ENCODING_DESCRIPTIONS = {
    'float16': 'teacher_topk_logprobs: the K log-probabilities at temperature 1 as float16',
    'uint8': ('teacher_topk_uint8: entries 2..K as round(255 * (p(i) / p(1)) ** (1/3)), code 0 read as 0.25; '
              'absolute values from teacher_rest_logprob_t1: p(i) = (1 - rest) * ratio(i) / sum(ratios)'),
}
TEMPERATURE_SEMANTICS = (
    'Log-probs are log_softmax of the teacher logits (cut to the tokenizer length) at temperature 1. '
    'teacher_rest_logprob_t{T} is log of the teacher mass outside the K ids in softmax(logits / T), computed in '
    'float32 from the full logits. At temperature T the loss uses p_T(i) = (1 - rest_T) * softmax(logprobs / T)(i), '
    'exact for every recorded T.')


def plan(cfg: Mapping[str, Any], settings: PrecomputeSettings, tokenizer: Any, samples: int) -> dict[str, Any]:
    """What the output depends on; a rerun must find the same plan to continue an earlier run's parts."""
    teachers = [_absolute(section) for _, section in teacher_entries(cfg['model'])]
    local = settings.dataset.get('local')
    ensemble = {'teachers': teachers, 'weights': check_ensemble(cfg['model']),
                'ensemble': ensemble_mode(cfg['model'])}
    return {
        **({'teacher': teachers[0]} if len(teachers) == 1 else ensemble),
        'tokenizer': {'name': str(cfg['tokenizer']['name']), 'size': len(tokenizer),
                      'fingerprint': tokenizer_fingerprint(tokenizer)},
        'source': {'local': os.path.abspath(local) if local else None, 'remote': settings.dataset.get('remote'),
                   'split': settings.dataset.get('split'), 'samples': samples},
        'max_seq_len': settings.max_seq_len, 'top_k': settings.top_k, 'logprobs': settings.encoding,
        'temperatures': list(settings.temperatures), 'samples_per_part': settings.samples_per_part,
        'compression': settings.compression, 'precision': settings.precision,
    }


def _absolute(section: Mapping[str, Any]) -> dict[str, Any]:
    """A teacher section with a local folder made absolute (the plan must not depend on the working directory)."""
    section = dict(section)
    source = section.get('pretrained_model_name_or_path')
    if source is not None and os.path.isdir(os.path.expanduser(source)):
        section['pretrained_model_name_or_path'] = os.path.abspath(os.path.expanduser(source))
    return section


def _teacher_record(plan: Mapping[str, Any], models: Sequence[Any]) -> dict[str, Any]:
    """The metadata's ``teacher``: source and weight fingerprint of the model, or for an ensemble the members,
    their weights and the mode, with a fingerprint of them all (None unless every member has one)."""
    sections = [plan['teacher']] if 'teacher' in plan else plan['teachers']
    members = [{'source': str(section.get('pretrained_model_name_or_path') or 'config'),
                'fingerprint': teacher_fingerprint(section.get('pretrained_model_name_or_path') or ''),
                'config': section, 'embedding_rows': embedding_rows(model)} for section, model in zip(sections, models)]
    if 'teacher' in plan:
        return members[0]
    parts = [f'{m["source"]} ({w:g})' for m, w in zip(members, plan['weights'])]
    fingerprints = [m['fingerprint'] for m in members]
    digest = None
    if all(fingerprints):
        identity = json.dumps([fingerprints, plan['weights'], plan['ensemble']])
        digest = hashlib.sha256(identity.encode()).hexdigest()
    return {'source': f'ensemble ({plan["ensemble"]}) of {", ".join(parts)}', 'fingerprint': digest,
            'members': members, 'weights': plan['weights'], 'ensemble': plan['ensemble']}


def check_plan(settings: PrecomputeSettings, plan: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """Refuses an output folder planned with other settings; returns the metadata when it is complete."""
    earlier = read_json(os.path.join(settings.split_dir, PLAN_FILE))
    if earlier is not None and earlier != plan:
        key = next(k for k in sorted(set(plan) | set(earlier)) if plan.get(k) != earlier.get(k))
        raise ConfigError(f'precompute.out: {settings.split_dir} holds a precompute with other settings ({key}: '
                          f'{earlier.get(key)!r} there, {plan.get(key)!r} now); use another folder or remove it')
    if earlier is None and os.path.isdir(settings.split_dir) and os.listdir(settings.split_dir):
        raise ConfigError(f'precompute.out: {settings.split_dir} exists and is not a precompute-teacher output; '
                          'use an empty or new folder')
    return read_metadata(settings.out_local, None, settings.dataset.get('split')) if earlier is not None else None


def metadata(plan: Mapping[str, Any], settings: PrecomputeSettings, models: Sequence[Any],
             columns: Mapping[str, str], totals: Mapping[str, int], num_parts: int) -> dict[str, Any]:
    """The ``teacher_topk.json`` of a finished split (``models``: the teacher, or the ensemble's members)."""
    return {
        'format': FORMAT_NAME,
        'version': FORMAT_VERSION,
        'teacher': _teacher_record(plan, models),
        'tokenizer': plan['tokenizer'],
        'vocab_size': plan['tokenizer']['size'],
        'top_k': settings.top_k,
        'logprob_encoding': {'name': settings.encoding, 'description': ENCODING_DESCRIPTIONS[settings.encoding]},
        'max_seq_len': settings.max_seq_len,
        'temperatures': list(settings.temperatures),
        'temperature_semantics': TEMPERATURE_SEMANTICS,
        'columns': dict(columns),
        'source': plan['source'],
        'samples': totals['samples'],
        'tokens': totals['tokens'],
        'bytes': totals['bytes'],
        'compressed_bytes': totals['zip_bytes'],
        'parts': {'count': num_parts, 'samples_per_part': settings.samples_per_part},
        'precision': settings.precision,
        'composer_kd_version': importlib.metadata.version('composer-kd'),
    }


def summary(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {'samples': metadata['samples'], 'tokens': metadata['tokens'], 'bytes': metadata['bytes'],
            'bytes_per_token': metadata['bytes'] / max(metadata['tokens'], 1)}
