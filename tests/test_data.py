"""``prepare-data`` shards, the collator and the token counter behind ``token_data_spec``."""

import hashlib
import json

import numpy as np
import torch
from streaming import StreamingDataset

from composer_kd import token_data_spec
from composer_kd.cli import main
from composer_kd.data.prepare import split_of
from composer_kd.data.tokens import collate_tokens, count_tokens
from composer_kd.losses import scored_positions


def _digest(folder) -> str:
    return hashlib.sha256(b''.join(p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file())).hexdigest()


def _corpus(tmp_path):
    corpus = tmp_path / 'corpus'
    (corpus / 'sub').mkdir(parents=True)
    for i in range(30):
        (corpus / f'doc{i:02d}.txt').write_text(f'document {i} ' + 'def f(x): return x * 2\n' * (i + 1))
    lines = [json.dumps({'text': f'record {i} ' * 20}) for i in range(20)]
    (corpus / 'sub' / 'records.jsonl').write_text('\n'.join(lines) + '\n')
    (corpus / 'ignored.md').write_text('not read: wrong extension')
    return corpus


def test_prepare_data_is_deterministic_and_lossless(capsys, tmp_path, tiny_assets) -> None:
    corpus = _corpus(tmp_path)
    args = ['prepare-data', '--input', str(corpus), '--tokenizer', str(tiny_assets / 'tokenizer'), '--max-seq-len',
            '32', '--val-fraction', '0.2']
    assert main(args + ['--out', str(tmp_path / 'a')]) == 0
    assert main(args + ['--out', str(tmp_path / 'b')]) == 0
    assert 'train:' in capsys.readouterr().out
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    documents = [(p.name, p.read_text()) for p in sorted(corpus.glob('*.txt'))]
    documents += [(f'sub/records.jsonl:{i + 1}', f'record {i} ' * 20) for i in range(20)]
    for split in ('train', 'val'):
        ds = StreamingDataset(local=str(tmp_path / 'a' / split), shuffle=False, batch_size=1)
        samples = [ds[i]['tokens'] for i in range(len(ds))]
        assert all(s.dtype == np.int32 and len(s) <= 32 for s in samples)
        assert all(len(s) == 32 for s in samples[:-1])
        names = [name for name, _ in documents if split_of(name, 0.2) == split]  # file order, then line order
        want = [t for name in names for t in tok(dict(documents)[name])['input_ids'] + [tok.eos_token_id]]
        assert np.concatenate(samples).tolist() == want  # concatenated in order, nothing lost


def test_prepare_data_bad_inputs(capsys, tmp_path, tiny_assets) -> None:
    tok = str(tiny_assets / 'tokenizer')
    base = ['prepare-data', '--tokenizer', tok, '--max-seq-len', '16', '--out', str(tmp_path / 'out')]
    cases = [
        (['--input', str(tmp_path / 'missing')], 'no such file or folder'),
        (['--input', str(tmp_path), '--extensions', '.none'], 'no files ending in'),
        (['--input', str(_corpus(tmp_path)), '--val-fraction', '1.0'], '--val-fraction must be in [0, 1)'),
        (['--input', str(tmp_path / 'corpus'), '--max-seq-len', '1'], '--max-seq-len must be at least 2'),
    ]
    for extra, match in cases:
        assert main(base + extra) == 2
        assert match in capsys.readouterr().err
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"text": "ok"}\n{"txt": "wrong key"}\n')
    assert main(base + ['--input', str(bad)]) == 2
    assert "bad.jsonl:2: expected an object with a string field 'text'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.jsonl', 'corpus']  # no partial output left
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep').write_text('x')
    assert main(base + ['--input', str(tmp_path / 'corpus')]) == 2
    assert 'exists and is not empty' in capsys.readouterr().err


def test_collator_masks_padding_by_position_not_by_token() -> None:
    eos = 5  # pad id == a real token id: real occurrences must stay in the loss
    batch = collate_tokens([{'input_ids': torch.tensor([1, 5, 2, 5])}, {'input_ids': torch.tensor([3, 5])}],
                           pad_token_id=eos)
    assert batch['input_ids'].tolist() == [[1, 5, 2, 5], [3, 5, 5, 5]]
    assert batch['attention_mask'].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch['labels'].tolist() == [[1, 5, 2, 5], [3, 5, -100, -100]]


def test_token_counter_equals_the_loss_denominator() -> None:
    batch = collate_tokens([{'input_ids': torch.arange(n)} for n in (7, 1, 4)])
    batch['labels'][0, 3] = -100
    counts = token_data_spec([batch]).get_num_tokens_in_batch(batch, token_type='loss_generating')
    assert counts == int(scored_positions(batch['labels']).sum()) == 6 + 0 + 3 - 1
    assert count_tokens(batch)['total'] == 12
    assert count_tokens({'input_ids': batch['input_ids']})['loss_generating'] == 3 * 6


def _tokens(folder) -> list[tuple[list[int], str]]:
    ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    return [(ds[i]['tokens'].tolist(), ds[i]['source']) for i in range(len(ds))]


def test_prepare_data_at_corpus_scale(capsys, monkeypatch, tmp_path, tiny_assets) -> None:
    """Any number of workers writes the same shards; .jsonl.gz reads as .jsonl; a file larger than a piece is
    tokenized piece by piece (bounded memory) as one document; --remote gets the same shards."""
    import gzip

    from transformers import AutoTokenizer

    from composer_kd.data import documents
    corpus = _corpus(tmp_path)
    records = (corpus / 'sub' / 'records.jsonl').read_bytes()
    (corpus / 'sub' / 'records.jsonl').unlink()
    (corpus / 'sub' / 'records.jsonl.gz').write_bytes(gzip.compress(records))
    big = corpus / 'big.txt'
    big.write_text(''.join(f'line {i}: some text\n' for i in range(400)))  # 8 KB: many pieces below
    monkeypatch.setattr(documents, 'PIECE_CHARS', 1000)
    args = ['prepare-data', '--input', str(corpus), '--tokenizer', str(tiny_assets / 'tokenizer'), '--max-seq-len',
            '32', '--val-fraction', '0.2']
    assert main([*args, '--out', str(tmp_path / 'one'), '--workers', '1']) == 0
    assert main([*args, '--out', str(tmp_path / 'two'), '--workers', '2', '--remote', str(tmp_path / 'remote')]) == 0
    assert _digest(tmp_path / 'one') == _digest(tmp_path / 'two')
    for split in ('train', 'val'):  # the upload holds what the local copy holds
        assert _tokens(tmp_path / 'remote' / split) == _tokens(tmp_path / 'two' / split)
    capsys.readouterr()

    tok = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    text = big.read_text()
    pieces, start = [], 0
    while start < len(text):  # the cuts read_pieces makes: whole lines, at most 1,000 characters
        end = start + 1000 if start + 1000 < len(text) else len(text)
        end = text.rfind('\n', start, end) + 1 if end < len(text) else end
        pieces.append(text[start:end])
        start = end
    want = [t for piece in pieces for t in tok(piece, add_special_tokens=False)['input_ids']] + [tok.eos_token_id]
    read = list(documents.read_pieces('big.txt', str(big), 'text'))
    assert [text for _, text, _ in read] == pieces
    assert [last for _, _, last in read] == [False] * (len(read) - 1) + [True]
    flat = [t for ids, _ in _tokens(tmp_path / 'one' / split_of('big.txt', 0.2)) for t in ids]
    # One document: its pieces' tokens in a row, EOS once, at its end.
    assert len(pieces) > 5 and any(flat[i:i + len(want)] == want for i in range(len(flat) - len(want) + 1))


def test_prepare_data_bos_eos_and_no_wrap(tmp_path, tiny_assets) -> None:
    """Foundry's concat_tokens options: each document is bos + ids + eos; with no wrap, a document cut by the end
    of a sample does not continue into the next one, so every sample starts at a document start."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    corpus = tmp_path / 'docs.jsonl'
    texts = [f'document number {i} ' * (3 + i % 5) for i in range(40)]
    corpus.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    base = ['prepare-data', '--input', str(corpus), '--tokenizer', str(tiny_assets / 'tokenizer'), '--max-seq-len',
            '24', '--val-fraction', '0', '--bos-text', 'BOS', '--eos-text', '']
    assert main([*base, '--out', str(tmp_path / 'wrap')]) == 0
    assert main([*base, '--out', str(tmp_path / 'nowrap'), '--no-wrap']) == 0
    bos = tok('BOS', add_special_tokens=False)['input_ids']
    docs = [bos + tok(t, add_special_tokens=False)['input_ids'] for t in texts]
    wrapped = _tokens(tmp_path / 'wrap' / 'train')
    assert [t for ids, _ in wrapped for t in ids] == [t for d in docs for t in d]  # no EOS: eos_text ''
    nowrap = _tokens(tmp_path / 'nowrap' / 'train')
    assert len(nowrap) < len(wrapped)
    starts = {tuple(d[:len(bos) + 2]) for d in docs}
    assert all(tuple(ids[:len(bos) + 2]) in starts for ids, _ in nowrap)  # every sample starts a document
    assert all(len(ids) == 24 for ids, _ in nowrap[:-1])


def test_prepare_data_refuses_no_workers(capsys, tmp_path, tiny_assets) -> None:
    assert main(['prepare-data', '--input', str(_corpus(tmp_path)), '--tokenizer', str(tiny_assets / 'tokenizer'),
                 '--max-seq-len', '16', '--out', str(tmp_path / 'out'), '--workers', '0']) == 2
    assert '--workers must be at least 1, got 0' in capsys.readouterr().err


def test_worker_tokenizer_writes_the_ids_transformers_writes(tiny_assets) -> None:
    """Workers run the fast tokenizer's Rust backend from its JSON (no transformers import); the ids must be the
    ones ``tokenizer(texts, add_special_tokens=False)`` gives, special-token text and non-ASCII included."""
    from transformers import AutoTokenizer

    from composer_kd.data.tokenize_worker import build_tokenizer, tokenize, tokenizer_spec
    tok = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    texts = ['def f(x):\n    return x * 2\n', f'a {tok.eos_token} b', 'naïve café — 東京', '', '  spaces  ']
    want = tok(texts, add_special_tokens=False)['input_ids']
    spec = tokenizer_spec(tok, str(tiny_assets / 'tokenizer'))
    assert spec[0] == 'json'
    for built in (build_tokenizer(spec), build_tokenizer(('name', str(tiny_assets / 'tokenizer')))):
        got = tokenize(texts, built)
        assert [ids.tolist() for ids in got] == want and all(ids.dtype == np.int32 for ids in got)


def test_text_pieces_match_a_line_by_line_reference(monkeypatch, tmp_path) -> None:
    """Pieces read in blocks are the greedy runs of whole lines a line-by-line reader cuts: long lines, a missing
    final newline, CRLF, a file of exactly one piece, an empty file."""
    import random

    from composer_kd.data import documents
    monkeypatch.setattr(documents, 'PIECE_CHARS', 50)

    def reference(text: str) -> list[str]:
        pieces, piece, size = [], [], 0
        for line in text.splitlines(keepends=True):
            if size + len(line) > 50 and piece:
                pieces.append(''.join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        return pieces + [''.join(piece)]

    rng = random.Random(0)
    texts = ['', 'x' * 50, 'x' * 49 + '\n', 'x' * 51, 'x' * 50 + '\n', 'a\n' * 25 + 'b', 'y' * 120 + '\nshort\n']
    texts += [''.join('z' * rng.choice([0, 1, 5, 30, 49, 50, 51, 90]) + rng.choice(['\n', '\n', '\r\n'])
                      for _ in range(rng.randrange(1, 40))) + rng.choice(['', 'tail']) for _ in range(300)]
    for i, text in enumerate(texts):
        path = tmp_path / f'{i}.txt'
        path.write_bytes(text.encode())
        read = list(documents.read_pieces(path.name, str(path), 'text'))
        want = reference(text.replace('\r\n', '\n'))  # text mode reads CRLF as LF
        assert [piece for _, piece, _ in read] == want, text
        assert [last for _, _, last in read] == [False] * (len(want) - 1) + [True]
