"""Teacher ensembles: ``ensemble_teacher_logits`` against plain-Python mixtures, and ``DistillationModel`` with
several teachers against one."""

import pytest
import torch
from helpers import tiny_gpt2
from reference import divergence, softmax

from composer_kd import DistillationModel, distillation_loss, ensemble_teacher_logits
from composer_kd.data.tokens import collate_tokens
from composer_kd.losses import check_ensemble_weights


def _batch(vocab: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return collate_tokens([{'input_ids': torch.randint(0, vocab, (n,), generator=g)} for n in (7, 5)])


@pytest.mark.parametrize('temperature', [1.0, 2.5])
def test_probs_mode_is_the_hand_computed_mixture(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    weights = check_ensemble_weights([2.0, 1.0, 1.0], 3)
    assert weights == [0.5, 0.25, 0.25]
    got = torch.softmax(ensemble_teacher_logits(iter([a, b, c]), weights, 'probs', temperature) / temperature, -1)
    for i in range(2):
        for t in range(3):
            rows = [softmax(x[i, t].tolist(), temperature) for x in (a, b, c)]
            want = [sum(w * r[v] for w, r in zip(weights, rows)) for v in range(6)]
            assert got[i, t].tolist() == pytest.approx(want, rel=1e-12)


def test_logits_mode_is_the_weighted_mean_of_logits() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    got = ensemble_teacher_logits([a, b], [0.7, 0.3], 'logits', temperature=3.0)
    torch.testing.assert_close(got, 0.7 * a + 0.3 * b)


@pytest.mark.parametrize('mode', ['probs', 'logits'])
def test_an_ensemble_of_identical_teachers_is_that_teacher(mode: str) -> None:
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(2)) * 4
    for teachers, weights in (([logits], [1.0]), ([logits, logits.clone()], [0.9, 0.1])):
        got = ensemble_teacher_logits(teachers, weights, mode, temperature=2.0)
        torch.testing.assert_close(torch.log_softmax(got / 2.0, -1), torch.log_softmax(logits / 2.0, -1))


def test_bad_weights_and_modes_are_refused() -> None:
    assert check_ensemble_weights(None, 4) == [0.25] * 4
    for weights, match in (([1.0], '1 entries for 2'), ([1.0, 0.0], 'positive'), ([1.0, -2.0], 'positive'),
                           ([1.0, float('nan')], 'positive'), ([True, 1.0], 'positive'), ([1.0, 'x'], 'positive')):
        with pytest.raises(ValueError, match=match):
            check_ensemble_weights(weights, 2)
    with pytest.raises(ValueError, match='ensemble must be one of'):
        ensemble_teacher_logits([torch.zeros(1, 1, 2)], [1.0], 'mean')
    with pytest.raises(ValueError, match='shape'):
        ensemble_teacher_logits([torch.zeros(1, 1, 2), torch.zeros(1, 1, 3)], [0.5, 0.5])
    with pytest.raises(ValueError, match='1 teachers for 2 weights'):
        ensemble_teacher_logits([torch.zeros(1, 1, 2)], [0.5, 0.5])


@pytest.mark.parametrize('mode', ['probs', 'logits'])
def test_model_with_one_or_two_identical_teachers_equals_the_single_teacher(mode: str) -> None:
    batch = _batch()
    settings = {'alpha': 0.3, 'temperature': 2.0}
    single = DistillationModel(tiny_gpt2(seed=1), tiny_gpt2(seed=2, n_layer=2), **settings)
    want = single.loss(single(batch), batch)
    for teachers in ([tiny_gpt2(seed=2, n_layer=2)], [tiny_gpt2(seed=2, n_layer=2), tiny_gpt2(seed=2, n_layer=2)]):
        model = DistillationModel(tiny_gpt2(seed=1), teachers, teacher_weights=[3.0] * len(teachers), ensemble=mode,
                                  **settings)
        got = model.loss(model(batch), batch)
        for key in ('total', 'ce', 'kd'):
            assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5, abs=1e-6), key  # float32


def test_model_with_two_teachers_distils_towards_their_mixture() -> None:
    """The model's KD term is the forward KL from the weighted mixture of the tempered teachers (textbook
    formula, plain Python) to the tempered student, averaged over the scored tokens."""
    batch, temperature = _batch(), 1.5
    student = tiny_gpt2(seed=1, dtype=torch.float64)
    teachers = [tiny_gpt2(seed=2, n_layer=2, dtype=torch.float64), tiny_gpt2(seed=3, dtype=torch.float64)]
    with torch.no_grad():  # peaked, distinct teachers: a mixture far from either
        for teacher, scale in zip(teachers, (40.0, 25.0)):
            teacher.transformer.wte.weight.mul_(scale)
    model = DistillationModel(student, teachers, teacher_weights=[0.7, 0.3], alpha=0.0, temperature=temperature)
    outputs = model(batch)
    student_logits = outputs['logits'].detach()
    got = model.loss(outputs, batch)
    with torch.no_grad():
        each = [t(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits for t in teachers]
    total, count = 0.0, 0
    for i in range(batch['labels'].shape[0]):
        for t in range(batch['labels'].shape[1] - 1):
            if batch['labels'][i, t + 1] == -100:
                continue
            rows = [softmax(x[i, t].tolist(), temperature) for x in each]
            mixture = [0.7 * p + 0.3 * q for p, q in zip(*rows)]
            total += divergence('forward_kl', mixture, softmax(student_logits[i, t].tolist(), temperature))
            count += 1
    assert total / count > 0.1
    assert got['kd'].item() == pytest.approx(total / count, rel=1e-9)
    # The loss is distillation_loss on the ensemble logits, and only the student gets a gradient.
    ensemble = ensemble_teacher_logits(each, [0.7, 0.3], 'probs', temperature)
    want = distillation_loss(student_logits, ensemble, batch['labels'], alpha=0.0, temperature=temperature)
    assert got['total'].item() == pytest.approx(want['total'].item(), rel=1e-12)
    got['total'].backward()
    assert all(p.grad is None for p in model.teachers.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.parameters())


def test_model_refuses_bad_ensembles() -> None:
    with pytest.raises(ValueError, match='1 entries for 2'):
        DistillationModel(tiny_gpt2(), [tiny_gpt2(), tiny_gpt2()], teacher_weights=[1.0])
    with pytest.raises(ValueError, match='ensemble must be one of'):
        DistillationModel(tiny_gpt2(), [tiny_gpt2(), tiny_gpt2()], ensemble='median')
    with pytest.raises(ValueError, match='pass the tokenizer'):
        DistillationModel(tiny_gpt2(), [tiny_gpt2(), tiny_gpt2(vocab_size=64)])
    with pytest.raises(ValueError, match='teacher_weights without teachers'):
        DistillationModel(tiny_gpt2(), None, alpha=1.0, teacher_weights=[1.0])
