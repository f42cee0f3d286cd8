"""``DistillationModel``: frozen teacher, student-only state, vocabulary reconciliation, metrics."""

import pytest
import torch
from composer.metrics import LanguageCrossEntropy
from helpers import tiny_gpt2
from transformers import PreTrainedTokenizerFast

from composer_kd import DistillationModel, distillation_loss
from composer_kd.data.tokens import collate_tokens
from composer_kd.model.vocab import check_same_vocabulary
from composer_kd.quickstart.tiny_assets import train_bpe_tokenizer


def _batch(vocab: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return collate_tokens([{'input_ids': torch.randint(0, vocab, (n,), generator=g)} for n in (9, 4, 6)])


def test_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    model = DistillationModel(tiny_gpt2(seed=1), tiny_gpt2(seed=2, n_layer=2))
    assert not any(p.requires_grad for p in model.teachers.parameters())
    assert all(p.requires_grad for p in model.model.parameters())
    model.train()
    assert model.model.training and not model.teachers.training
    assert not any(m.training for m in model.teachers.modules())
    outputs = model(_batch())
    assert outputs['logits'].requires_grad and not outputs['teacher_logits'].requires_grad


def test_state_dict_holds_the_student_only_and_loads_strictly() -> None:
    model = DistillationModel(tiny_gpt2(seed=1), tiny_gpt2(seed=2, n_layer=2))
    state = model.state_dict()
    assert state and all(k.startswith('model.') for k in state)
    other = DistillationModel(tiny_gpt2(seed=5), tiny_gpt2(seed=2, n_layer=2))
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    # Teacher keys in an old checkpoint are ignored, never loaded over the teacher.
    before = {k: v.clone() for k, v in other.teachers.state_dict().items()}
    noisy = dict(state, **{f'teachers.{k}': torch.zeros_like(v) for k, v in before.items()},
                 **{f'teacher.{k[2:]}': torch.zeros_like(v) for k, v in before.items()})  # one teacher, up to 0.1
    other.load_state_dict(noisy, strict=True)
    assert all(torch.equal(other.teachers.state_dict()[k], v) for k, v in before.items())
    # A missing student key is still an error under strict loading.
    state.pop(next(iter(state)))
    with pytest.raises(RuntimeError, match='missing keys'):
        other.load_state_dict(state, strict=True)


def test_a_student_only_state_loads_while_composer_asks_for_the_whole_model() -> None:
    """Composer's LoadCheckpoint callback clears should_save_peft_only to load a checkpoint (as its FSDP2
    broadcast does): our student-only checkpoints still load strictly, and the teachers stay as they are."""
    model = DistillationModel(tiny_gpt2(seed=1), tiny_gpt2(seed=2, n_layer=2))
    state = model.state_dict()
    other = DistillationModel(tiny_gpt2(seed=5), tiny_gpt2(seed=3, n_layer=2))
    before = {k: v.clone() for k, v in other.teachers.state_dict().items()}
    other.should_save_peft_only = False  # what LoadCheckpoint._load does around load_checkpoint
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(other.model.state_dict()[k[len('model.'):]], v) for k, v in state.items())
    assert all(torch.equal(other.teachers.state_dict()[k], v) for k, v in before.items())
    whole = other.state_dict()  # the broadcast's whole state: the teachers travel
    assert any(k.startswith('teachers.') for k in whole)
    model.should_save_peft_only = False
    model.load_state_dict(whole, strict=True)
    assert all(torch.equal(model.teachers.state_dict()[k], v) for k, v in before.items())


def test_padded_vocabularies_are_cut_to_the_tokenizer(tmp_path, tiny_assets) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_assets / 'tokenizer')
    n = len(tokenizer)
    student, teacher = tiny_gpt2(vocab_size=n, seed=1), tiny_gpt2(vocab_size=n + 64, seed=2)
    model = DistillationModel(student, teacher, tokenizer, alpha=0.5, temperature=2.0)
    batch = _batch(vocab=n)
    outputs = model(batch)
    assert outputs['teacher_logits'].shape[-1] == n and outputs['logits'].shape[-1] == n
    teacher_logits = teacher(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
    want = distillation_loss(outputs['logits'], teacher_logits[..., :n], batch['labels'], alpha=0.5,
                             temperature=2.0)['total']
    got = model.loss(outputs, batch)['total']
    assert outputs['teacher_logits'] is None  # released once the loss has its gradient
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match='pass the tokenizer'):
        DistillationModel(tiny_gpt2(vocab_size=n, seed=1), tiny_gpt2(vocab_size=n + 64, seed=2))


def test_tokenizer_longer_than_the_student_is_refused(tiny_assets) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_assets / 'tokenizer')
    with pytest.raises(ValueError, match=f'has {len(tokenizer)} tokens but the student has only 100'):
        DistillationModel(tiny_gpt2(vocab_size=100), tiny_gpt2(vocab_size=len(tokenizer)), tokenizer)


def test_tokenizers_that_map_ids_differently_are_refused(tmp_path, tiny_assets) -> None:
    ours = PreTrainedTokenizerFast.from_pretrained(tiny_assets / 'tokenizer')
    check_same_vocabulary(ours, PreTrainedTokenizerFast.from_pretrained(tiny_assets / 'tokenizer'), 'teacher')
    text = tmp_path / 'other.txt'
    text.write_text('completely different text, other merges ' * 50)
    theirs = train_bpe_tokenizer([str(text)], vocab_size=300, out_dir=str(tmp_path / 'tok'))
    with pytest.raises(ValueError, match='the teacher tokenizer maps token'):
        check_same_vocabulary(ours, theirs, 'teacher')


def test_without_teacher_alpha_must_be_one() -> None:
    with pytest.raises(ValueError, match='needs alpha=1'):
        DistillationModel(tiny_gpt2(), None, alpha=0.5)
    model = DistillationModel(tiny_gpt2(), None, alpha=1.0)
    batch = _batch()
    losses = model.loss(model(batch), batch)
    assert losses['kd'].item() == 0.0 and losses['total'].item() == pytest.approx(losses['ce'].item())
    assert set(model.get_metrics(is_train=False)) == {'LanguageCrossEntropy', 'LanguagePerplexity'}


def test_eval_metrics_match_the_loss_terms() -> None:
    model = DistillationModel(tiny_gpt2(seed=1), tiny_gpt2(seed=2, n_layer=2), alpha=0.5, temperature=1.5,
                              divergence='skew_kl', lam=0.2)
    model.eval()
    batch = _batch()
    outputs = model.eval_forward(batch)
    losses = model.loss(dict(outputs), batch)
    metrics = model.get_metrics(is_train=False)
    for metric in metrics.values():
        model.update_metric(batch, outputs, metric)
    assert metrics['LanguageCrossEntropy'].compute().item() == pytest.approx(losses['ce'].item(), rel=1e-5)
    assert metrics['TeacherDivergenceLoss'].compute().item() == pytest.approx(losses['kd'].item(), rel=1e-5)
    top1_s = outputs['logits'].argmax(-1)[:, :-1]
    top1_t = outputs['teacher_logits'].argmax(-1)[:, :-1]
    scored = batch['labels'][:, 1:] != -100
    agreement = (top1_s == top1_t)[scored].float().mean().item()
    assert metrics['TeacherTop1Agreement'].compute().item() == pytest.approx(agreement)
    assert isinstance(metrics['LanguageCrossEntropy'], LanguageCrossEntropy)


def test_fsdp_policies_wrap_blocks_and_never_checkpoint_the_teacher() -> None:
    model = DistillationModel(tiny_gpt2(seed=1), tiny_gpt2(seed=2, n_layer=2))
    block = model.teachers[0].transformer.h[0]
    assert model.model.fsdp_wrap_fn(model.model.transformer.h[0]) and model.teachers.fsdp_wrap_fn(block)
    assert model.teachers.fsdp_wrap_fn(model.teachers[0]) and not model.teachers.fsdp_wrap_fn(model.model)
    assert not model.model.fsdp_wrap_fn(model.model.transformer.wte)
    assert model.model.activation_checkpointing_fn(model.model.transformer.h[0])
    assert not model.teachers.activation_checkpointing_fn(block)


def test_chunked_language_metrics_equal_composers() -> None:
    from composer.metrics import LanguageCrossEntropy as ComposerCE
    from composer.metrics import LanguagePerplexity as ComposerPPL

    from composer_kd.model.metrics import ChunkedLanguageCrossEntropy, ChunkedLanguagePerplexity
    g = torch.Generator().manual_seed(0)
    pairs = [(ChunkedLanguageCrossEntropy(), ComposerCE()), (ChunkedLanguagePerplexity(), ComposerPPL())]
    for _ in range(3):  # several updates accumulate
        logits = torch.randn(2, 9, 37, generator=g) * 3
        targets = torch.randint(0, 37, (2, 9), generator=g)
        targets[1, 5:] = -100
        for ours, theirs in pairs:
            ours.update(logits, targets)
            theirs.update(logits, targets)
    for ours, theirs in pairs:
        assert ours.compute().item() == pytest.approx(theirs.compute().item(), rel=1e-6)


def test_precomputed_teacher_comes_with_the_batch_only() -> None:
    with pytest.raises(ValueError, match='pass teacher=None'):
        DistillationModel(tiny_gpt2(), tiny_gpt2(seed=2), precomputed_teacher=True)
    model = DistillationModel(tiny_gpt2(), None, alpha=0.5, precomputed_teacher=True)
    assert set(model.get_metrics(is_train=False)) == {'LanguageCrossEntropy', 'LanguagePerplexity',
                                                      'TeacherDivergenceLoss', 'TeacherTop1Agreement'}
    model.train()
    with pytest.raises(ValueError, match="needs batches with the teacher's top-k"):
        model(_batch())
    model.eval()
    outputs = model.eval_forward(_batch())  # eval data without a teacher: the student's metrics still work
    metrics = model.get_metrics(is_train=False)
    model.update_metric(_batch(), outputs, metrics['LanguageCrossEntropy'])
    with pytest.raises(ValueError, match='TeacherDivergenceLoss needs the teacher'):
        model.update_metric(_batch(), outputs, metrics['TeacherDivergenceLoss'])
