"""What a ``precompute-teacher`` run records about itself: the plan a rerun must match, what each process's
folder and the remote already hold (rank 0 decides from them for every rank), and the metadata of a finished
split (``teacher_topk.json``)."""

import hashlib
import importlib.metadata
import json
import os
from typing import Any, Mapping, Sequence

from composer_kd.data.teacher_topk import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from composer_kd.config.precompute_config import PrecomputeSettings
from composer_kd.config.run_rules import ensemble_mode, ensemble_weights, teacher_entries
from composer_kd.data.json_files import read_json, remote_json
from composer_kd.data.topk_parts import PLAN_FILE, complete_parts, remote_parts
from composer_kd.model.vocab import embedding_rows

__all__ = ['decide', 'local_state', 'metadata', 'plan', 'summary']

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
    ensemble = {'teachers': teachers, 'weights': ensemble_weights(cfg['model']),
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


def _other_settings(key: str, folder: str, earlier: Mapping[str, Any], plan: Mapping[str, Any]) -> str:
    name = next(k for k in sorted(set(plan) | set(earlier)) if plan.get(k) != earlier.get(k))
    return (f'{key}: {folder} holds a precompute with other settings ({name}: {earlier.get(name)!r} there, '
            f'{plan.get(name)!r} now); use another folder or remove it')


def local_state(settings: PrecomputeSettings, plan: Mapping[str, Any]) -> dict[str, Any]:
    """What this process's output folder holds: ``{'folder', 'error', 'metadata', 'parts'}``: an error for a
    folder planned with other settings or that is not a precompute output, the metadata when the split is
    complete there, and its complete parts ``{part: record}``."""
    folder = settings.split_dir
    earlier = read_json(os.path.join(folder, PLAN_FILE))
    error = None
    if earlier is not None and earlier != plan:
        error = _other_settings('precompute.out', folder, earlier, plan)
    elif earlier is None and os.path.isdir(folder) and os.listdir(folder):
        error = f'precompute.out: {folder} exists and is not a precompute-teacher output; use an empty or new folder'
    usable = earlier is not None and error is None
    return {'folder': folder, 'error': error,
            'metadata': read_json(os.path.join(folder, METADATA_FILE)) if usable else None,
            'parts': complete_parts(folder) if usable else {}}


def decide(settings: PrecomputeSettings, plan: Mapping[str, Any], states: Sequence[Mapping[str, Any]],
           num_parts: int) -> dict[str, Any]:
    """Rank 0's decision for every rank, from each rank's ``local_state`` and the remote: ``{'error'}`` (the
    run must stop: the same ``ConfigError`` on every rank), ``{'metadata'}`` (the split is complete), or
    ``{'kept': {part: record}, 'uploads': {rank: [part, ...]}, 'upload_plan': bool}``: the complete parts, which
    ranks upload the complete parts only their folders hold, and whether the plan must go to the remote first.

    Without a remote every rank must share rank 0's folder, and rank 0's parts are the complete ones. With a
    remote, a part is complete when the remote holds it or any rank's folder does (the first such rank
    uploads it); a split is complete when the remote holds its metadata.
    """
    for state in states:
        if state['error']:
            return {'error': state['error']}
    folders = [state['folder'] for state in states]
    remote = settings.remote_split
    if not remote:
        other = next((r for r, folder in enumerate(folders) if folder != folders[0]), None)
        if other is not None:
            return {'error': f'precompute.out.local is {folders[0]} on rank 0 but {folders[other]} on rank '
                             f'{other}: processes that write to different folders need precompute.out.remote '
                             '(each uploads its parts there); without one, give every process the same folder'}
        return {'metadata': states[0]['metadata'], 'kept': states[0]['parts'], 'uploads': {}, 'upload_plan': False}
    earlier = remote_json(os.path.join(remote, PLAN_FILE))
    if earlier is not None and earlier != plan:
        return {'error': _other_settings('precompute.out.remote', remote, earlier, plan)}
    if earlier is None and any(remote_json(os.path.join(remote, name)) for name in ('index.json', METADATA_FILE)):
        return {'error': f'precompute.out.remote: {remote} holds a dataset that is not a precompute-teacher output; '
                         'use an empty or new folder'}
    metadata = remote_json(os.path.join(remote, METADATA_FILE)) if earlier is not None else None
    if metadata is not None:
        return {'metadata': metadata}
    # Parts reach the remote only after the plan: without it, nothing there belongs to this precompute.
    kept = remote_parts(remote, range(num_parts)) if earlier is not None else {}
    uploads: dict[int, list[int]] = {}
    for rank, state in enumerate(states):
        for part, part_record in sorted(state['parts'].items()):
            if part not in kept:
                kept[part] = part_record
                uploads.setdefault(rank, []).append(part)
    return {'metadata': None, 'kept': kept, 'uploads': uploads, 'upload_plan': earlier is None}


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
