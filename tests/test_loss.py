"""``distillation_loss`` against a slow, independent per-token reference in plain Python floats."""

import math

import pytest
import torch
from helpers import assert_gradient_matches_finite_differences
from reference import divergence as _reference_divergence
from reference import softmax as _softmax

from composer_kd import distillation_loss
from composer_kd.losses import chunked as chunked_loss
from composer_kd.losses.divergences import DIVERGENCES

DIVERGENCE_CASES = [
    ('forward_kl', {}),
    ('reverse_kl', {}),
    ('jsd', {}),
    ('jsd', {'beta': 0.2}),
    ('skew_kl', {}),
    ('skew_kl', {'lam': 0.4}),
    ('skew_reverse_kl', {}),
    ('skew_reverse_kl', {'lam': 0.3}),
    ('tvd', {}),
]


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
                   temperature: float, divergence: str, shift_labels: bool = True, **kwargs: float) -> dict[str, float]:
    """Loops over every (b, t): CE at temperature 1 and the divergence at ``temperature``."""
    ce_sum = kd_sum = 0.0
    n = 0
    B, T, _ = student.shape
    for b in range(B):
        for t in range(T - 1 if shift_labels else T):
            target = int(labels[b, t + 1] if shift_labels else labels[b, t])
            if target == -100:
                continue
            n += 1
            s_row, t_row = student[b, t].double().tolist(), teacher[b, t].double().tolist()
            ce_sum += -math.log(_softmax(s_row, 1.0)[target])
            kd_sum += _reference_divergence(divergence, _softmax(t_row, temperature), _softmax(s_row, temperature),
                                            **kwargs)
    ce, kd = (ce_sum / n, kd_sum / n) if n else (0.0, 0.0)
    return {'total': alpha * ce + (1 - alpha) * temperature**2 * kd, 'ce': ce, 'kd': kd}


def _batch(seed: int = 0, B: int = 3, T: int = 7, V: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 4:] = -100  # right padding
    labels[-1, 2] = -100  # a hole in the middle
    return student, teacher, labels


@pytest.fixture(params=['ranges', 'gathered'], autouse=True)
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs every test with both row walks of the chunked loss: contiguous ranges (padding rows skipped inside
    them) and gathered scored rows."""
    monkeypatch.setattr(chunked_loss, '_DENSE_FRACTION', 0.0 if request.param == 'ranges' else 2.0)
    return request.param


@pytest.mark.parametrize('divergence,kwargs', DIVERGENCE_CASES)
@pytest.mark.parametrize('alpha,temperature', [(0.5, 1.0), (0.0, 2.5), (1.0, 0.7), (0.3, 4.0)])
def test_matches_reference(divergence: str, kwargs: dict, alpha: float, temperature: float) -> None:
    student, teacher, labels = _batch()
    got = distillation_loss(student, teacher, labels, alpha=alpha, temperature=temperature, divergence=divergence,
                            **kwargs)
    want = reference_loss(student, teacher, labels, alpha, temperature, divergence, **kwargs)
    for key in ('total', 'ce', 'kd'):
        assert got[key].dtype == torch.float32
        assert got[key].item() == pytest.approx(want[key], rel=2e-5, abs=1e-6), key


@pytest.mark.parametrize('divergence,kwargs', DIVERGENCE_CASES)
def test_unshifted_labels_match_reference(divergence: str, kwargs: dict) -> None:
    student, teacher, labels = _batch(seed=1)
    got = distillation_loss(student, teacher, labels, alpha=0.4, temperature=1.5, divergence=divergence,
                            shift_labels=False, **kwargs)
    want = reference_loss(student, teacher, labels, 0.4, 1.5, divergence, shift_labels=False, **kwargs)
    assert got['total'].item() == pytest.approx(want['total'], rel=2e-5)


def test_masked_positions_do_not_matter() -> None:
    student, teacher, labels = _batch()
    base = distillation_loss(student, teacher, labels)['total']
    # Positions 3.. of row 0 predict masked targets (labels[0, 4:] = -100) and the last position has no target.
    student[0, 3:] = torch.randn_like(student[0, 3:]) * 50
    teacher[0, 3:] = 0.0
    student[:, -1] = 1e4
    assert distillation_loss(student, teacher, labels)['total'].item() == pytest.approx(base.item(), rel=1e-6)


@pytest.mark.parametrize('divergence', sorted(DIVERGENCES))
def test_all_masked_is_zero_with_zero_gradient(divergence: str) -> None:
    student, teacher, labels = _batch()
    student.requires_grad_(True)
    labels[:] = -100
    out = distillation_loss(student, teacher, labels, alpha=0.3, temperature=2.0, divergence=divergence)
    assert all(out[k].item() == 0.0 for k in ('total', 'ce', 'kd'))
    out['total'].backward()
    assert student.grad is not None and torch.count_nonzero(student.grad) == 0


@pytest.mark.parametrize('divergence', sorted(DIVERGENCES))
def test_divergence_is_zero_for_identical_distributions_and_positive_otherwise(divergence: str) -> None:
    student, teacher, labels = _batch()
    same = distillation_loss(teacher * 1.0, teacher, labels, alpha=0.0, divergence=divergence)
    assert same['kd'].item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(student, teacher, labels, alpha=0.0, divergence=divergence)['kd'].item() > 1e-3


def test_jsd_half_is_symmetric() -> None:
    student, teacher, labels = _batch()
    forward = distillation_loss(student, teacher, labels, alpha=0.0, divergence='jsd')['kd']
    swapped = distillation_loss(teacher, student, labels, alpha=0.0, divergence='jsd')['kd']
    assert forward.item() == pytest.approx(swapped.item(), rel=1e-5)


def test_alpha_one_needs_no_teacher() -> None:
    student, _, labels = _batch()
    out = distillation_loss(student, None, labels, alpha=1.0)
    assert out['kd'].item() == 0.0
    assert out['total'].item() == pytest.approx(reference_loss(student, student, labels, 1.0, 1.0, 'tvd')['ce'],
                                                 rel=1e-6)


@pytest.mark.parametrize('divergence,kwargs', DIVERGENCE_CASES)
@pytest.mark.parametrize('temperature', [1.0, 1.7])
def test_gradient_matches_finite_differences(divergence: str, kwargs: dict, temperature: float) -> None:
    # Directional derivatives in float64: (L(x + e·v) − L(x − e·v)) / 2e against <grad L, v>.
    student, teacher, labels = (x.double() if x.is_floating_point() else x for x in _batch())

    def loss(s: torch.Tensor) -> torch.Tensor:
        return distillation_loss(s, teacher, labels, alpha=0.3, temperature=temperature, divergence=divergence,
                                 chunk_elements=25, **kwargs)['total']  # 2 rows a chunk: many chunks

    assert_gradient_matches_finite_differences(loss, student)


def test_backward_runs_once() -> None:
    student, teacher, labels = _batch()
    student.requires_grad_(True)
    out = distillation_loss(student, teacher, labels)['total']
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='call backward on it only once'):
        out.backward()


def test_chunking_does_not_change_values_or_gradients() -> None:
    student, teacher, labels = _batch()
    results = []
    for chunk_elements in (11, 50, 10**6):
        leaf = student.clone().requires_grad_(True)
        out = distillation_loss(leaf, teacher, labels, alpha=0.4, temperature=2.0, chunk_elements=chunk_elements)
        out['total'].backward()
        results.append((out['total'].item(), leaf.grad))
    for value, grad in results[1:]:
        assert value == pytest.approx(results[0][0], rel=1e-6)
        assert torch.allclose(grad, results[0][1], atol=1e-7)


@pytest.mark.parametrize('divergence', sorted(set(DIVERGENCES) - {'reverse_kl'}))
def test_masked_vocabulary_entries_give_finite_values_and_gradients(divergence: str) -> None:
    student, teacher, labels = _batch()
    teacher[..., -2:] = float('-inf')  # e.g. tokens a teacher never emits
    labels = labels.clamp(max=8).masked_fill(labels < 0, -100)
    student.requires_grad_(True)
    out = distillation_loss(student, teacher, labels, alpha=0.2, temperature=2.0, divergence=divergence)
    out['total'].backward()
    assert torch.isfinite(out['total']) and torch.isfinite(student.grad).all()
    want = reference_loss(student.detach(), teacher, labels, 0.2, 2.0, divergence)
    assert out['total'].item() == pytest.approx(want['total'], rel=2e-5)


def test_reverse_kl_is_infinite_where_the_teacher_has_no_mass() -> None:
    # KL(q‖p) = ∞ when p_v = 0 < q_v: the honest value, unlike a silent clamp (use skew_reverse_kl instead).
    student, teacher, labels = _batch()
    teacher[..., -1] = float('-inf')
    assert distillation_loss(student, teacher, labels, divergence='reverse_kl')['kd'].item() == float('inf')


def test_bf16_logits_are_computed_in_float32() -> None:
    student, teacher, labels = _batch()
    student16, teacher16 = student.bfloat16(), teacher.bfloat16()
    out = distillation_loss(student16, teacher16, labels, alpha=0.5, temperature=2.0)
    want = reference_loss(student16.float(), teacher16.float(), labels, 0.5, 2.0, 'forward_kl')
    assert out['total'].dtype == torch.float32
    assert out['total'].item() == pytest.approx(want['total'], rel=2e-5)


def test_bf16_gradient_of_a_mostly_padded_batch() -> None:
    # Under 75% scored positions the loss gathers the scored rows; their float32 gradient goes back into the
    # bf16 gradient buffer (this crashed with "Index put requires the source and destination dtypes match").
    student, teacher, labels = _batch()
    labels[:, labels.shape[1] // 3:] = -100
    student16 = student.bfloat16().requires_grad_(True)
    distillation_loss(student16, teacher.bfloat16(), labels, alpha=0.5)['total'].backward()
    want = student.bfloat16().float().requires_grad_(True)
    distillation_loss(want, teacher.bfloat16().float(), labels, alpha=0.5)['total'].backward()
    assert student16.grad.dtype == torch.bfloat16
    assert torch.allclose(student16.grad.float(), want.grad, rtol=1e-2, atol=1e-2 * float(want.grad.abs().max()))


@pytest.mark.parametrize('kwargs,match', [
    ({'alpha': 1.5}, 'alpha .* got 1.5'),
    ({'alpha': -0.1}, 'alpha .* got -0.1'),
    ({'temperature': 0.0}, 'temperature .* got 0.0'),
    ({'temperature': -1}, 'temperature .* got -1'),
    ({'divergence': 'kl'}, "divergence .* got 'kl'"),
    ({'divergence': 'jsd', 'beta': 1.2}, 'beta .* got 1.2'),
    ({'divergence': 'forward_kl', 'beta': 0.5}, "no argument 'beta'"),
    ({'divergence': 'skew_kl', 'lam': -0.5}, 'lam .* got -0.5'),
])
def test_bad_arguments_name_argument_and_value(kwargs: dict, match: str) -> None:
    student, teacher, labels = _batch()
    with pytest.raises(ValueError, match=match):
        distillation_loss(student, teacher, labels, **kwargs)


def test_shape_mismatches_are_refused() -> None:
    student, teacher, labels = _batch()
    with pytest.raises(ValueError, match='teacher_logits shape'):
        distillation_loss(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match='labels must be'):
        distillation_loss(student, teacher, labels[:, :-1])
    with pytest.raises(ValueError, match=r'student_logits must be \(B, T, V\)'):
        distillation_loss(student[0], teacher[0], labels[0])
    with pytest.raises(ValueError, match='teacher_logits is None'):
        distillation_loss(student, None, labels, alpha=0.5)
