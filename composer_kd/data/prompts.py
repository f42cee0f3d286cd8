"""Prompt datasets for on-policy distillation: ``.jsonl`` prompts (and optional responses) → MDS splits, and
batches of prompts left-padded to one fixed width.

Shapes: B batch, P the dataset's prompt width (its longest prompt), R the batch's longest response.

A record (one JSON object a line) is one of:

* ``{"prompt": "...", "response": "..."}`` — LLM Foundry's finetuning jsonl; ``response`` may be left out. The
  prompt is tokenized as the tokenizer does by default (its own special tokens), the response without special
  tokens and with the tokenizer's EOS appended (the student must learn to stop);
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` — rendered with the tokenizer's chat template: the
  messages before a final assistant message, with ``add_generation_prompt``, are the prompt; that assistant
  message, as the template renders it (its end-of-turn token included), is the response.

A prompt longer than ``max_prompt_len`` is refused, or with ``overflow='cut'`` cut to its last
``max_prompt_len`` tokens (the end of a prompt leads into the answer); a response longer than
``max_response_len`` likewise, keeping its first tokens. What was cut is counted in the summary, never silent.

Every prompt of a batch is left-padded to the dataset's own prompt width P (``prompts.json``), not the batch's:
a prompt's tokens then meet the same computation whatever batch it lands in, so a sampled continuation does not
depend on the batch composition or the number of processes.
"""

import functools
import gzip
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from composer.core import DataSpec
from streaming import MDSWriter, StreamingDataset
from torch.utils.data import DataLoader

from composer_kd.data.documents import split_of
from composer_kd.data.json_files import read_json, write_json
from composer_kd.data.staging import staged_folder
from composer_kd.data.streaming_resources import raise_open_file_limit
from composer_kd.errors import ConfigError, DataError

__all__ = [
    'PROMPTS_FILE', 'PromptDataset', 'build_prompt_dataloader', 'collate_prompts', 'prepare_prompts', 'read_prompts_info'
]

PROMPTS_FILE = 'prompts.json'  # beside the splits: the prompt width and how the data was made
# A response may be empty, which MDS's ndarray encoding refuses: it is stored as little-endian int32 bytes.
COLUMNS = {'prompt': 'ndarray:int32', 'response': 'bytes', 'source': 'str'}
OVERFLOW = ('refuse', 'cut')


def _records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt', encoding='utf-8') as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f'{path}:{line_no}: not valid JSON ({e.msg})') from e
            if not isinstance(record, dict):
                raise ConfigError(f'{path}:{line_no}: expected a JSON object, got {type(record).__name__}')
            yield line_no, record


def _texts(where: str, record: Mapping[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of one record (the response may be empty)."""
    if 'messages' in record:
        messages = record['messages']
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)
                for m in messages):
            raise ConfigError(f'{where}: messages must be a non-empty list of {{role, content}} objects')
        if tokenizer.chat_template is None:
            raise ConfigError(f'{where}: chat messages need a tokenizer with a chat template')
        has_response = messages[-1]['role'] == 'assistant'
        turns = messages[:-1] if has_response else messages
        if not turns:
            raise ConfigError(f'{where}: messages hold an assistant message and nothing to prompt it')
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        response = ''
        if has_response:
            whole = tokenizer.apply_chat_template(messages, tokenize=False)
            if not whole.startswith(prompt):
                raise ConfigError(f'{where}: the chat template does not render the prompt as the start of the whole '
                                  'conversation; give prompt/response records instead')
            response = whole[len(prompt):]
        ids = lambda text: tokenizer(text, add_special_tokens=False)['input_ids']  # noqa: E731
        return ids(prompt), ids(response) if response else []
    prompt, response = record.get('prompt'), record.get('response')
    if not isinstance(prompt, str) or (response is not None and not isinstance(response, str)):
        raise ConfigError(f'{where}: expected a string "prompt" (and optionally a string "response"), or "messages"')
    prompt_ids = tokenizer(prompt)['input_ids']
    response_ids = []
    if response:
        response_ids = tokenizer(response, add_special_tokens=False)['input_ids']
        if tokenizer.eos_token_id is not None and (not response_ids or response_ids[-1] != tokenizer.eos_token_id):
            response_ids.append(tokenizer.eos_token_id)
    return prompt_ids, response_ids


def prepare_prompts(inputs: Sequence[str], tokenizer: Any, out: str, max_prompt_len: int,
                    max_response_len: Optional[int] = None, overflow: str = 'refuse', val_fraction: float = 0.05,
                    overwrite: bool = False) -> dict[str, Any]:
    """Writes ``out/train`` and ``out/val`` prompt MDS splits and ``out/prompts.json``; returns the summary
    ``{split: {'prompts', 'with_response'}, 'cut_prompts', 'cut_responses', 'prompt_width'}``.

    Args:
        inputs (Sequence[str]): ``.jsonl`` / ``.jsonl.gz`` files, or folders holding them.
        tokenizer: a Hugging Face tokenizer (or the name of one).
        max_prompt_len (int): tokens a prompt may have. max_response_len (int, optional): tokens a response may
            have (default: any).
        overflow (str): ``'refuse'`` (a longer one stops the run, naming its line) or ``'cut'``.
        val_fraction (float): share of records for ``val``, chosen by a hash of file and line.

    Raises:
        ConfigError: for a bad record (named by file and line), a refused overflow, or bad arguments.
    """
    from composer_kd.data.documents import find_documents
    if overflow not in OVERFLOW:
        raise ConfigError(f'--overflow must be one of {list(OVERFLOW)}, got {overflow!r}')
    if max_prompt_len < 1 or (max_response_len is not None and max_response_len < 1):
        raise ConfigError('--max-prompt-len and --max-response-len must be positive numbers of tokens')
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f'--val-fraction must be in [0, 1), got {val_fraction}')
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f'--out: {out} exists and is not empty (pass --overwrite to replace it)')
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    counts = {'train': {'prompts': 0, 'with_response': 0}, 'val': {'prompts': 0, 'with_response': 0}}
    cut_prompts = cut_responses = width = 0
    with staged_folder(out) as staging:
        writers = {split: MDSWriter(columns=COLUMNS, out=os.path.join(staging, split), compression='zstd')
                   for split in ('train', 'val')}
        for name, path in find_documents(inputs, ('.jsonl', '.jsonl.gz')):
            for line_no, record in _records(path):
                where = f'{path}:{line_no}'
                prompt, response = _texts(where, record, tokenizer)
                if not prompt:
                    raise ConfigError(f'{where}: the prompt has no tokens')
                if len(prompt) > max_prompt_len:
                    if overflow == 'refuse':
                        raise ConfigError(f'{where}: the prompt has {len(prompt)} tokens, more than --max-prompt-len '
                                          f'{max_prompt_len} (raise it, or pass --overflow cut)')
                    prompt, cut_prompts = prompt[-max_prompt_len:], cut_prompts + 1
                if max_response_len is not None and len(response) > max_response_len:
                    if overflow == 'refuse':
                        raise ConfigError(f'{where}: the response has {len(response)} tokens, more than '
                                          f'--max-response-len {max_response_len} (raise it, or pass --overflow cut)')
                    response, cut_responses = response[:max_response_len], cut_responses + 1
                split = split_of(f'{name}:{line_no}', val_fraction)
                writers[split].write({'prompt': np.asarray(prompt, dtype=np.int32),
                                      'response': np.asarray(response, dtype='<i4').tobytes(),
                                      'source': f'{name}:{line_no}'})
                counts[split]['prompts'] += 1
                counts[split]['with_response'] += bool(response)
                width = max(width, len(prompt))
        for writer in writers.values():
            writer.finish()
        if counts['train']['prompts'] == 0:
            raise ConfigError(f'--input: no prompts in {list(inputs)}')
        summary = {**counts, 'cut_prompts': cut_prompts, 'cut_responses': cut_responses, 'prompt_width': width}
        write_json(os.path.join(staging, PROMPTS_FILE), {
            'format': 'composer-kd prompts', 'version': 1, 'prompt_width': width, 'max_prompt_len': max_prompt_len,
            'max_response_len': max_response_len, 'overflow': overflow, 'vocab_size': len(tokenizer),
            'summary': summary})
    return summary


def read_prompts_info(local: Optional[str], remote: Optional[str] = None) -> dict[str, Any]:
    """The ``prompts.json`` of a prompt dataset (``local`` folder, or downloaded from ``remote``)."""
    info = read_json(os.path.join(local, PROMPTS_FILE)) if local else None
    if info is None and remote:
        from composer_kd.data.json_files import remote_json
        info = remote_json(os.path.join(remote, PROMPTS_FILE))
    if info is None or info.get('format') != 'composer-kd prompts':
        raise ConfigError(f'no prompt dataset at {remote or local} (no {PROMPTS_FILE}); make one with `composer-kd '
                          'prepare-data --prompts`')
    return info


class PromptDataset(StreamingDataset):
    """A ``StreamingDataset`` of prompts: each sample gives ``prompt_ids``, ``response_ids`` (maybe empty) and
    ``sample_id`` (its global index: stable across processes, shuffles and resumes).

    Args:
        vocab_size (int, optional): every id must be below it (the tokenizer's length).
        **kwargs: ``StreamingDataset``'s (``local``, ``remote``, ``split``, ``shuffle``, ``batch_size``, ...).
    """

    def __init__(self, vocab_size: Optional[int] = None, **kwargs: Any) -> None:
        raise_open_file_limit()
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self._where = os.path.join(kwargs.get('local') or kwargs.get('remote') or '', kwargs.get('split') or '')

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        if 'prompt' not in sample:
            raise DataError(f'{self._where}: samples need a \'prompt\' column (a prompt dataset from `composer-kd '
                            f'prepare-data --prompts`); this dataset has {sorted(sample)}')
        prompt, response = np.asarray(sample['prompt']), np.frombuffer(sample.get('response', b''), dtype='<i4')
        for ids in (prompt, response):
            if len(ids) and (ids.min() < 0 or (self.vocab_size is not None and ids.max() >= self.vocab_size)):
                raise DataError(f'{self._where}: sample {index} holds ids outside the tokenizer\'s {self.vocab_size} '
                                'ids (data prepared with another tokenizer?)')
        return {'prompt_ids': torch.from_numpy(prompt.astype(np.int64)),
                'response_ids': torch.from_numpy(response.astype(np.int64)), 'sample_id': torch.tensor(index)}


def collate_prompts(samples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int,
                    prompt_width: int) -> dict[str, torch.Tensor]:
    """``prompt_ids`` / ``prompt_mask`` ``(B, P)`` left-padded to ``prompt_width``, ``response_ids`` /
    ``response_mask`` ``(B, R)`` right-padded, ``sample_id`` ``(B,)``."""
    B = len(samples)
    prompts = torch.full((B, prompt_width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, prompt_width), dtype=torch.long)
    width = max((len(s['response_ids']) for s in samples), default=0)
    responses = torch.full((B, width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((B, width), dtype=torch.long)
    for row, sample in enumerate(samples):
        prompt, response = sample['prompt_ids'][-prompt_width:], sample['response_ids']
        prompts[row, prompt_width - len(prompt):] = prompt
        prompt_mask[row, prompt_width - len(prompt):] = 1
        responses[row, :len(response)] = response
        response_mask[row, :len(response)] = 1
    return {'prompt_ids': prompts, 'prompt_mask': prompt_mask, 'response_ids': responses,
            'response_mask': response_mask, 'sample_id': torch.stack([torch.as_tensor(s['sample_id']) for s in samples])}


def build_prompt_dataloader(dataset: Mapping[str, Any], batch_size: int, pad_token_id: int, batch_transform: Any,
                            get_num_tokens_in_batch: Any, drop_last: bool = True, num_workers: int = 0,
                            pin_memory: bool = False, prefetch_factor: Optional[int] = None,
                            persistent_workers: bool = False, timeout: float = 0,
                            vocab_size: Optional[int] = None, key: Optional[str] = None) -> DataSpec:
    """The ``DataSpec`` of a prompt dataset: batches of prompts, turned into training batches by
    ``batch_transform`` (Composer applies it before it counts the batch's tokens and splits it into microbatches,
    so both see the rewritten batch).

    Args:
        dataset (Mapping): ``StreamingDataset`` arguments (``local``, ``remote``, ``split``, ``shuffle``, ...).
        batch_transform (Callable): prompt batch → training batch (``callbacks.OnPolicyDistillation``).
        get_num_tokens_in_batch (Callable): the token counter of the training batches.
        key (str, optional): the config section, named in errors.
    """
    where = f'{key}: ' if key else ''
    kwargs = {k: v for k, v in dataset.items() if k != 'max_seq_len'}
    local, remote, split = kwargs.get('local'), kwargs.get('remote'), kwargs.get('split')
    info = read_prompts_info(local, remote)
    try:
        dset = PromptDataset(vocab_size=vocab_size, batch_size=batch_size, **kwargs)
    except ValueError as e:  # StreamingDataset's checks of its arguments
        raise ConfigError(f'{where}{str(e).splitlines()[0]}') from e
    if len(dset) == 0:
        raise ConfigError(f'{where}the prompt dataset at local={local!r} split={split!r} has no samples')
    workers = num_workers > 0
    loader = DataLoader(dset, batch_size=batch_size,
                        collate_fn=functools.partial(collate_prompts, pad_token_id=pad_token_id,
                                                     prompt_width=info['prompt_width']),
                        drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if workers else None,
                        persistent_workers=persistent_workers and workers, timeout=timeout)
    return DataSpec(loader, get_num_tokens_in_batch=get_num_tokens_in_batch, batch_transforms=batch_transform,
                    get_num_samples_in_batch=_num_samples)


def _num_samples(batch: Mapping[str, Any]) -> int:
    """Rows of a rewritten batch (it also carries plain values, which Composer's default counter refuses)."""
    return int(batch['input_ids'].shape[0])
