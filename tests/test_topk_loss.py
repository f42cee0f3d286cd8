"""``topk_distillation_loss``: K = V equals the dense loss; K < V against a slow per-token bucket reference;
hand-computed buckets; gradients against finite differences; masking and bad inputs."""

import math

import pytest
import torch
from helpers import assert_gradient_matches_finite_differences
from reference import divergence as reference_divergence
from reference import softmax

from composer_kd import distillation_loss, topk_distillation_loss
from composer_kd.losses import chunked
from composer_kd.losses.divergences import DIVERGENCES
from composer_kd.losses.topk import teacher_buckets

DIVERGENCE_CASES = [
    ('forward_kl', {}),
    ('reverse_kl', {}),
    ('jsd', {}),
    ('jsd', {'beta': 0.2}),
    ('skew_kl', {'lam': 0.4}),
    ('skew_reverse_kl', {'lam': 0.3}),
    ('tvd', {}),
]
SETTINGS = [(0.5, 1.0), (0.0, 2.5), (1.0, 0.7), (0.3, 4.0)]


@pytest.fixture(params=['ranges', 'gathered'], autouse=True)
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both row walks of the chunked driver: contiguous ranges and gathered scored rows."""
    monkeypatch.setattr(chunked, '_DENSE_FRACTION', 0.0 if request.param == 'ranges' else 2.0)


def _batch(seed: int = 0, B: int = 3, T: int = 7, V: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 4:] = -100
    labels[-1, 2] = -100
    return student, teacher, labels


def _topk(teacher: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What precompute-teacher records: top-k ids and log-probs at T=1, and the log rest mass at T."""
    logprobs = torch.log_softmax(teacher.double(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    tempered = torch.log_softmax(teacher.double() / temperature, dim=-1)
    rest = tempered.scatter(-1, ids, float('-inf')).logsumexp(dim=-1)
    return ids, values.float(), rest.float()


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, k: int, alpha: float,
                   temperature: float, divergence: str, **kwargs: float) -> dict[str, float]:
    """Per token: buckets built from the *full* teacher distribution at T (its k most likely tokens at T=1,
    and the summed rest), the student grouped the same way, and the textbook divergence on the buckets."""
    ce_sum = kd_sum = 0.0
    n = 0
    B, T, V = student.shape
    for b in range(B):
        for t in range(T - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            n += 1
            s_row, t_row = student[b, t].double().tolist(), teacher[b, t].double().tolist()
            top = sorted(range(V), key=lambda v: -t_row[v])[:k]
            rest = [v for v in range(V) if v not in top]
            p, q = softmax(t_row, temperature), softmax(s_row, temperature)
            p_buckets = [p[v] for v in top] + ([sum(p[v] for v in rest)] if rest else [])
            q_buckets = [q[v] for v in top] + ([sum(q[v] for v in rest)] if rest else [])
            ce_sum += -math.log(softmax(s_row, 1.0)[target])
            kd_sum += reference_divergence(divergence, p_buckets, q_buckets, **kwargs)
    ce, kd = ce_sum / n, kd_sum / n
    return {'total': alpha * ce + (1 - alpha) * temperature**2 * kd, 'ce': ce, 'kd': kd}


@pytest.mark.parametrize('divergence,kwargs', DIVERGENCE_CASES)
@pytest.mark.parametrize('alpha,temperature', SETTINGS)
def test_k_equal_to_vocabulary_is_the_dense_loss(divergence: str, kwargs: dict, alpha: float,
                                                  temperature: float) -> None:
    student, teacher, labels = _batch()
    ids, logprobs, _ = _topk(teacher, teacher.shape[-1], 1.0)
    perm = torch.randperm(ids.shape[-1], generator=torch.Generator().manual_seed(3))  # order must not matter
    dense_student = student.clone().requires_grad_(True)
    sparse_student = student.clone().requires_grad_(True)
    dense = distillation_loss(dense_student, teacher, labels, alpha=alpha, temperature=temperature,
                              divergence=divergence, **kwargs)
    sparse = topk_distillation_loss(sparse_student, ids[..., perm], logprobs[..., perm], labels, alpha=alpha,
                                    temperature=temperature, divergence=divergence, **kwargs)
    for key in ('total', 'ce', 'kd'):
        assert sparse[key].item() == pytest.approx(dense[key].item(), rel=1e-6, abs=1e-6), key
    dense['total'].backward()
    sparse['total'].backward()
    assert torch.allclose(sparse_student.grad, dense_student.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('divergence,kwargs', DIVERGENCE_CASES)
@pytest.mark.parametrize('alpha,temperature', SETTINGS)
@pytest.mark.parametrize('k', [1, 4])
def test_matches_bucket_reference_with_recorded_rest(k: int, divergence: str, kwargs: dict, alpha: float,
                                                     temperature: float) -> None:
    student, teacher, labels = _batch(seed=1)
    ids, logprobs, rest = _topk(teacher, k, temperature)
    got = topk_distillation_loss(student, ids, logprobs, labels, alpha=alpha, temperature=temperature,
                                 divergence=divergence, teacher_rest_logprob=rest, **kwargs)
    want = reference_loss(student, teacher, labels, k, alpha, temperature, divergence, **kwargs)
    for key in ('total', 'ce', 'kd'):
        assert got[key].item() == pytest.approx(want[key], rel=2e-5, abs=1e-6), key


@pytest.mark.parametrize('divergence,kwargs', DIVERGENCE_CASES)
def test_rest_derived_at_temperature_one_matches_the_recorded_one(divergence: str, kwargs: dict) -> None:
    student, teacher, labels = _batch(seed=2)
    ids, logprobs, rest = _topk(teacher, 3, 1.0)
    recorded = topk_distillation_loss(student, ids, logprobs, labels, alpha=0.2, divergence=divergence,
                                      teacher_rest_logprob=rest, **kwargs)
    derived = topk_distillation_loss(student, ids, logprobs, labels, alpha=0.2, divergence=divergence, **kwargs)
    assert derived['total'].item() == pytest.approx(recorded['total'].item(), rel=1e-5)


def test_hand_computed_buckets() -> None:
    # One position, V = 5, K = 2. Teacher p = (.5, .2, .15, .1, .05): buckets (.5, .2 | .3).
    p = [0.5, 0.2, 0.15, 0.1, 0.05]
    ids = torch.tensor([[[0, 1]]])
    logprobs = torch.tensor([[[math.log(0.5), math.log(0.2)]]])
    q = [0.1, 0.3, 0.2, 0.25, 0.15]  # student: buckets (.1, .3 | .6)
    student = torch.tensor([[[math.log(x) for x in q], [0.0] * 5]])
    labels = torch.tensor([[0, 3]])
    out = topk_distillation_loss(student, ids.expand(1, 2, 2), logprobs.expand(1, 2, 2), labels, alpha=0.0)
    kl = 0.5 * math.log(0.5 / 0.1) + 0.2 * math.log(0.2 / 0.3) + 0.3 * math.log(0.3 / 0.6)
    assert out['kd'].item() == pytest.approx(kl, rel=1e-6)
    assert out['ce'].item() == pytest.approx(-math.log(0.25), rel=1e-6)
    # At T = 2 the teacher is p^(1/2) normalised over all five tokens; the recorded rest makes it exact.
    roots = [x**0.5 for x in p]
    p2 = [r / sum(roots) for r in roots]
    rest2 = torch.tensor([[math.log(sum(p2[2:]))] * 2])
    log_p, log_rest = teacher_buckets(logprobs[0], rest2[0, :1], 2.0, has_rest=True)
    assert log_p.exp().tolist()[0] == pytest.approx(p2[:2], rel=1e-6)
    assert log_rest.exp().item() == pytest.approx(sum(p2[2:]), rel=1e-6)
    # Without the record the rest at T cannot be derived (it depends on how the rest is spread): refused.
    with pytest.raises(ValueError, match='temperature=2 with K < V needs teacher_rest_logprob'):
        teacher_buckets(logprobs[0], None, 2.0, has_rest=True)


@pytest.mark.parametrize('divergence,kwargs', DIVERGENCE_CASES)
@pytest.mark.parametrize('temperature', [1.0, 1.7])
def test_gradient_matches_finite_differences(divergence: str, kwargs: dict, temperature: float) -> None:
    student, teacher, labels = (x.double() if x.is_floating_point() else x for x in _batch(seed=4))
    ids, logprobs, rest = _topk(teacher, 3, temperature)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return topk_distillation_loss(s, ids, logprobs.double(), labels, alpha=0.3, temperature=temperature,
                                      divergence=divergence, teacher_rest_logprob=rest.double(), chunk_elements=25,
                                      **kwargs)['total']

    assert_gradient_matches_finite_differences(loss, student)


@pytest.mark.parametrize('divergence', sorted(DIVERGENCES))
def test_masked_positions_and_all_masked(divergence: str) -> None:
    student, teacher, labels = _batch()
    ids, logprobs, rest = _topk(teacher, 4, 2.0)
    base = topk_distillation_loss(student, ids, logprobs, labels, alpha=0.3, temperature=2.0, divergence=divergence,
                                  teacher_rest_logprob=rest)['total']
    student[0, 3:] = torch.randn_like(student[0, 3:]) * 50  # positions 3.. of row 0 predict masked targets
    logprobs[0, 3:] = 0.0
    assert topk_distillation_loss(student, ids, logprobs, labels, alpha=0.3, temperature=2.0, divergence=divergence,
                                  teacher_rest_logprob=rest)['total'].item() == pytest.approx(base.item(), rel=1e-6)
    labels[:] = -100
    student.requires_grad_(True)
    out = topk_distillation_loss(student, ids, logprobs, labels, alpha=0.3, temperature=2.0, divergence=divergence,
                                 teacher_rest_logprob=rest)
    assert all(out[k].item() == 0.0 for k in ('total', 'ce', 'kd'))
    out['total'].backward()
    assert torch.count_nonzero(student.grad) == 0


def test_student_rest_stays_exact_when_the_student_is_peaked() -> None:
    # The student puts ~1e-8 outside the teacher's top-2 (float32 sums of the probabilities would cancel to 0 or
    # go negative); the rest is summed in float64, exact to ~1e-16 absolute.
    student = torch.tensor([[[20.0, 19.0, 2.0, 1.0, 0.0, 0.0]] * 2])
    ids = torch.tensor([[[0, 1]] * 2])
    logprobs = torch.log(torch.tensor([[[0.6, 0.3]] * 2]))
    labels = torch.tensor([[0, 1]])
    leaf = student.clone().requires_grad_(True)
    out = topk_distillation_loss(leaf, ids, logprobs, labels, alpha=0.0)
    q = torch.softmax(student[0, 0].double(), -1)
    q_rest = q[2:].sum().item()
    want = 0.6 * math.log(0.6 / q[0].item()) + 0.3 * math.log(0.3 / q[1].item()) + 0.1 * math.log(0.1 / q_rest)
    assert out['kd'].item() == pytest.approx(want, rel=1e-5)
    out['total'].backward()
    assert torch.isfinite(leaf.grad).all()
    # The rest tokens' gradients sum to Q_rest − P_rest = −0.1 (up to q_rest), the classic q − p of the bucket.
    assert leaf.grad[0, 0, 2:].sum().item() == pytest.approx(q_rest - 0.1, rel=1e-5)


@pytest.mark.parametrize('kwargs,match', [
    ({'ids': lambda i: i[..., :0]}, r'teacher_topk_ids must be \(B, T, K\)'),
    ({'ids': lambda i: i.float()}, 'integer ids'),
    ({'logprobs': lambda lp: lp[..., :2]}, 'teacher_topk_logprobs shape'),
    ({'rest': lambda r: r[:, :-1]}, 'teacher_rest_logprob must be'),
    ({'alpha': 2.0}, 'alpha'),
])
def test_bad_inputs_are_refused(kwargs: dict, match: str) -> None:
    student, teacher, labels = _batch()
    ids, logprobs, rest = _topk(teacher, 3, 1.0)
    same = lambda x: x  # noqa: E731
    with pytest.raises(ValueError, match=match):
        topk_distillation_loss(student, kwargs.get('ids', same)(ids), kwargs.get('logprobs', same)(logprobs), labels,
                               teacher_rest_logprob=kwargs.get('rest', same)(rest), alpha=kwargs.get('alpha', 0.5))
