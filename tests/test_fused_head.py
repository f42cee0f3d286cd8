"""The fused LM-head loss equals the logits path: the loss function against logits computed in full, and
``DistillationModel(fused_head=True)`` against ``fused_head=False`` on the Hugging Face models users bring, in value
and in the gradient of every student parameter. (Microbatching: ``test_microbatching.py``; 2 processes under
FSDP2: ``test_launcher.py``.)"""

import pytest
import torch
from helpers import tiny_gpt2
from tokenizers import Tokenizer, models
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from composer_kd import DistillationModel
from composer_kd.losses import (
    DIVERGENCES,
    TopKTeacher,
    distillation_loss,
    ensemble_teacher_logits,
    topk_distillation_loss,
)
from composer_kd.losses.fused import LinearHead, fused_distillation_loss
from composer_kd.model.head_tap import HeadTap

B, T, H, H_TEACHER, V, V_STUDENT, V_TEACHER = 3, 9, 8, 12, 50, 53, 56  # heads padded past the shared V
SETTINGS = [(0.5, 1.0), (0.2, 2.0), (0.0, 0.7), (1.0, 1.0)]


def _labels() -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    labels[0, :4] = -100  # a masked prefix
    labels[2, -2:] = -100  # and a masked suffix
    return labels


def _head(hidden_size: int, rows: int, seed: int, bias: bool = False, grad: bool = False,
          dtype: torch.dtype = torch.float64) -> LinearHead:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, hidden_size, generator=g, dtype=dtype)
    weight = torch.randn(rows, hidden_size, generator=g, dtype=dtype) * hidden_size**-0.5 * 3
    b = torch.randn(rows, generator=g, dtype=dtype) if bias else None
    for t in (hidden, weight, b):
        if t is not None:
            t.requires_grad_(grad)
    return LinearHead(hidden, weight, b)


def _logits(head: LinearHead) -> torch.Tensor:
    out = head.hidden @ head.weight.T + (0 if head.bias is None else head.bias)
    return out[..., :V]


def _grads(total: torch.Tensor, head: LinearHead) -> list[torch.Tensor]:
    inputs = [t for t in head if t is not None]
    return list(torch.autograd.grad(total * 3.0, inputs))  # scaled, as Composer scales microbatch losses


def _assert_close(got: dict, want: dict, grads_got: list, grads_want: list, tol: float) -> None:
    for key in ('total', 'ce', 'kd'):
        assert abs(float(got[key] - want[key])) <= tol * max(1.0, abs(float(want[key]))), key
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize('divergence', sorted(DIVERGENCES))
@pytest.mark.parametrize('alpha,temperature', SETTINGS)
def test_dense_teacher_matches_the_logits_path(divergence: str, alpha: float, temperature: float) -> None:
    student, teacher = _head(H, V_STUDENT, 1, bias=True, grad=True), _head(H_TEACHER, V_TEACHER, 2)
    labels = _labels()
    # 7 rows per chunk: several chunks, the last one short
    got = fused_distillation_loss(student, labels, teachers=[teacher], vocab_size=V, alpha=alpha,
                                  temperature=temperature, divergence=divergence, chunk_elements=7 * V)
    want = distillation_loss(_logits(student), _logits(teacher), labels, alpha=alpha, temperature=temperature,
                             divergence=divergence)
    _assert_close(got, want, _grads(got['total'], student), _grads(want['total'], student), 1e-10)
    # the padded rows of the head take no gradient
    assert torch.count_nonzero(_grads(fused_distillation_loss(student, labels, teachers=[teacher], vocab_size=V,
                                                              alpha=alpha)['total'], student)[1][V:]) == 0


@pytest.mark.parametrize('divergence', ['forward_kl', 'jsd', 'reverse_kl'])
@pytest.mark.parametrize('k,temperature', [(5, 1.0), (5, 2.0), (V, 1.5)])
def test_topk_teacher_matches_the_logits_path(divergence: str, k: int, temperature: float) -> None:
    student, labels = _head(H, V_STUDENT, 1, grad=True), _labels()
    teacher_logits = _logits(_head(H_TEACHER, V_TEACHER, 2))
    log_p = teacher_logits.log_softmax(-1)
    logprobs, ids = log_p.topk(k, dim=-1)
    tempered = (teacher_logits / temperature).log_softmax(-1)
    rest = torch.log1p(-tempered.gather(-1, ids).exp().sum(-1).clamp(max=1 - 1e-12)) if k < V else None
    topk = TopKTeacher(ids, logprobs, rest)
    got = fused_distillation_loss(student, labels, teacher_topk=topk, vocab_size=V, alpha=0.3,
                                  temperature=temperature, divergence=divergence, chunk_elements=5 * V)
    want = topk_distillation_loss(_logits(student), ids, logprobs, labels, alpha=0.3, temperature=temperature,
                                  divergence=divergence, teacher_rest_logprob=rest)
    _assert_close(got, want, _grads(got['total'], student), _grads(want['total'], student), 1e-10)


@pytest.mark.parametrize('mode', ['probs', 'logits'])
def test_ensemble_matches_the_logits_path(mode: str) -> None:
    student, labels = _head(H, V_STUDENT, 1, grad=True), _labels()
    teachers = [_head(H_TEACHER, V_TEACHER, 2), _head(H, V, 4, bias=True)]
    got = fused_distillation_loss(student, labels, teachers=teachers, teacher_weights=[1, 3], ensemble=mode,
                                  vocab_size=V, alpha=0.2, temperature=2.0, divergence='skew_kl', chunk_elements=4 * V)
    mixed = ensemble_teacher_logits((_logits(t) for t in teachers), [0.25, 0.75], mode, 2.0)
    want = distillation_loss(_logits(student), mixed, labels, alpha=0.2, temperature=2.0, divergence='skew_kl')
    _assert_close(got, want, _grads(got['total'], student), _grads(want['total'], student), 1e-10)


def test_float32_matches_to_1e5_at_a_larger_vocabulary() -> None:
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 96, 64, 5000
    h = torch.randn(1, n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).requires_grad_(True)
    teacher = LinearHead(torch.randn(1, n, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.4)
    labels = torch.randint(0, vocab, (1, n), generator=g)
    got = fused_distillation_loss(LinearHead(h, w), labels, teachers=[teacher], alpha=0.5, temperature=2.0)
    want = distillation_loss(h @ w.T, teacher.hidden @ teacher.weight.T, labels, alpha=0.5, temperature=2.0)
    _assert_close(got, want, _grads(got['total'], LinearHead(h, w)), _grads(want['total'], LinearHead(h, w)), 1e-5)


def test_no_grad_computes_no_gradient_and_backward_runs_once() -> None:
    student, teacher, labels = _head(H, V, 1, grad=True), _head(H, V, 2), _labels()
    with torch.no_grad():
        out = fused_distillation_loss(student, labels, teachers=[teacher])
    assert not out['total'].requires_grad
    out = fused_distillation_loss(student, labels, teachers=[teacher])
    out['total'].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='only once'):
        out['total'].backward()


@pytest.mark.parametrize('kwargs,match', [
    ({'teachers': []}, 'needs alpha == 1'),
    ({'vocab_size': 60}, r'student head weight must be \(V\', H\) = \(>= 60'),
    ({'teacher_topk': TopKTeacher(torch.zeros(B, T, 2, dtype=torch.long), torch.zeros(B, T, 2))},
     'teachers .* or teacher_topk, not both'),
    ({'alpha': 2.0}, 'alpha must be a number in'),
])
def test_bad_inputs_are_refused(kwargs: dict, match: str) -> None:
    arguments = {'teachers': [_head(H, V, 2)], **kwargs}
    with pytest.raises(ValueError, match=match):
        fused_distillation_loss(_head(H, V, 1), _labels(), **arguments)
    with pytest.raises(ValueError, match='teacher 0 hidden states must be'):
        fused_distillation_loss(_head(H, V, 1), _labels(), teachers=[LinearHead(torch.zeros(B, T + 1, H),
                                                                               torch.zeros(V, H))])


# -- the model: HeadTap on Hugging Face models ---------------------------------------------------------------------
def _llama_like(config_cls, model_cls, vocab: int, hidden: int, seed: int, tie: bool = False):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    return model_cls(config).double()


def _tokenizer(size: int) -> PreTrainedTokenizerFast:
    vocab = {f't{i}': i for i in range(size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token='t0')))


MODELS = {
    'gpt2-tied': lambda vocab, hidden, seed: tiny_gpt2(vocab, n_embd=hidden, seed=seed, dtype=torch.float64),
    'llama': lambda vocab, hidden, seed: _llama_like(LlamaConfig, LlamaForCausalLM, vocab, hidden, seed),
    'llama-tied': lambda vocab, hidden, seed: _llama_like(LlamaConfig, LlamaForCausalLM, vocab, hidden, seed, True),
    'qwen2': lambda vocab, hidden, seed: _llama_like(Qwen2Config, Qwen2ForCausalLM, vocab, hidden, seed),
    'mistral': lambda vocab, hidden, seed: _llama_like(MistralConfig, MistralForCausalLM, vocab, hidden, seed),
}


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {'input_ids': ids, 'attention_mask': mask, 'labels': torch.where(mask.bool(), ids, -100)}


def _step(fused: bool, student_kind: str, teacher_kinds: list[str], **kwargs) -> tuple[dict, dict]:
    """The loss and every student parameter's gradient of one training forward + backward."""
    student = MODELS[student_kind](V_STUDENT, 16, 1)
    teachers = [MODELS[kind](V_TEACHER, 24, 2 + i) for i, kind in enumerate(teacher_kinds)]
    model = DistillationModel(student, teachers or None, _tokenizer(V), fused_head=fused, **kwargs).train()
    batch = _batch()
    outputs = model(batch)
    assert (outputs['logits'] is None) == fused  # the fused step has no logits at all
    losses = model.loss(outputs, batch)
    (losses['total'] * 2.0).backward()
    return losses, {name: p.grad for name, p in student.named_parameters()}


@pytest.mark.parametrize('student_kind,teacher_kinds,kwargs', [
    ('gpt2-tied', ['llama'], {'alpha': 0.3, 'temperature': 2.0}),
    ('llama', ['qwen2'], {'alpha': 0.5, 'divergence': 'jsd'}),
    ('llama-tied', ['mistral'], {'alpha': 0.0, 'divergence': 'reverse_kl', 'temperature': 0.8}),
    ('qwen2', ['gpt2-tied', 'llama'], {'alpha': 0.2, 'teacher_weights': [1, 3], 'ensemble': 'probs'}),
    ('mistral', [], {'alpha': 1.0}),
])
def test_model_fused_step_equals_the_logits_step(student_kind: str, teacher_kinds: list[str], kwargs: dict) -> None:
    got_losses, got = _step(True, student_kind, teacher_kinds, **kwargs)
    want_losses, want = _step(False, student_kind, teacher_kinds, **kwargs)
    for key in want_losses:
        assert abs(float(got_losses[key] - want_losses[key])) <= 1e-12
    assert set(got) == set(want)
    for name in want:
        assert got[name] is not None and want[name] is not None, name  # every parameter is trained
        assert torch.allclose(got[name], want[name], rtol=1e-9, atol=1e-12), name


def test_model_logits_path_for_monitored_batches() -> None:
    model = DistillationModel(tiny_gpt2(V, seed=1), tiny_gpt2(V, seed=2), fused_head=True).train()
    assert model(_batch())['logits'] is None
    model.stat_sums = {}  # KDMonitor records this batch: its statistics need the logits
    outputs = model(_batch())
    assert outputs['logits'].shape[-1] == V and outputs['teacher_logits'] is not None


def test_models_that_change_their_logits_after_the_head_are_refused() -> None:
    config = Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match=r'Gemma2ForCausalLM transforms its logits after the head '
                                         r'\(final_logit_softcapping=30.0\)'):
        DistillationModel(Gemma2ForCausalLM(config), None, alpha=1.0, fused_head=True)

    class Scaled(GPT2LMHeadModel):  # a model that rescales its logits in forward: caught at the first step

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    student = Scaled(tiny_gpt2(V).config)
    model = DistillationModel(student, None, alpha=1.0, fused_head=True).train()
    with pytest.raises(ValueError, match='fused_head cannot split Scaled: it changes the LM head'):
        model(_batch())


def test_head_tap_is_inert_outside_its_context() -> None:
    model = tiny_gpt2(V, seed=1)
    before = model(_batch()['input_ids']).logits
    tap = HeadTap(model)
    assert torch.equal(model(_batch()['input_ids']).logits, before)
    captured = tap.capture(lambda: model(_batch()['input_ids']), copy=True)
    assert captured.hidden.shape == (3, 10, 16) and torch.equal(captured.weight, model.lm_head.weight)
    assert captured.weight.data_ptr() != model.lm_head.weight.data_ptr()  # copied
    assert torch.allclose(captured.hidden @ captured.weight.T, before, atol=1e-5)


def test_liger_qualifies_only_where_it_computes_the_same_objective() -> None:
    from composer_kd.losses.liger import liger_refusal
    student, teacher, labels = _head(H, V, 1), _head(H, V, 2), _labels()
    if not torch.cuda.is_available():  # the objective is checked before the machine
        assert liger_refusal(student, [teacher], None, 'forward_kl', labels) == 'Liger\'s kernels run on CUDA only'
    assert liger_refusal(student, [teacher], None, 'tvd', labels).startswith('divergence \'tvd\'')
    assert liger_refusal(student, [teacher, teacher], None, 'jsd', labels) == '2 teachers (Liger distils from one)'
    assert liger_refusal(_head(H, V, 1, bias=True), [teacher], None, 'jsd', labels) == 'a head with a bias'


def test_liger_option_falls_back_to_ours_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    losses = {}
    for fused in (True, 'liger'):
        model = DistillationModel(tiny_gpt2(V, seed=1), tiny_gpt2(V, seed=2), fused_head=fused).train()
        losses[fused] = float(model.loss(model(_batch()), _batch())['total'])
    assert losses['liger'] == losses[True]
    assert ('using composer-kd\'s fused loss instead of Liger\'s because of Liger\'s kernels run on CUDA only'
            in caplog.text)
    with pytest.raises(ValueError, match="fused_head must be True, False or 'liger', got 'yes'"):
        DistillationModel(tiny_gpt2(V), None, alpha=1.0, fused_head='yes')


def test_bfloat16_heads_match_the_logits_path_to_bf16_precision() -> None:
    # The GPU dtype, run on CPU: the weight gradient is summed over chunks in float32, so it is no worse than the
    # logits path's single bf16 matmul.
    student, labels = _head(H, V, 1, grad=True, dtype=torch.bfloat16), _labels()
    teacher = _head(H, V, 2, dtype=torch.bfloat16)
    got = fused_distillation_loss(student, labels, teachers=[teacher], alpha=0.5, temperature=2.0, chunk_elements=4 * V)
    want = distillation_loss(_logits(student), _logits(teacher), labels, alpha=0.5, temperature=2.0)
    assert student.weight.dtype == torch.bfloat16 and got['total'].dtype == torch.float32
    for a, b in zip(_grads(got['total'], student), _grads(want['total'], student)):
        assert a.dtype == torch.bfloat16
        assert float((a.float() - b.float()).abs().max()) <= 2e-2 * float(b.float().abs().max())
    assert abs(float(got['total'] - want['total'])) <= 1e-3 * abs(float(want['total']))


def _eval_metrics(fused: bool, teacher_kinds: list[str], **kwargs) -> dict[str, float]:
    student = MODELS['llama'](V_STUDENT, 16, 1)
    teachers = [MODELS[kind](V_TEACHER, 24, 2 + i) for i, kind in enumerate(teacher_kinds)]
    model = DistillationModel(student, teachers or None, _tokenizer(V), fused_head=fused, **kwargs).eval()
    metrics = model.get_metrics(is_train=False)
    with torch.no_grad():
        for seed in range(2):
            batch = _batch()
            batch['input_ids'] = torch.roll(batch['input_ids'], seed, dims=1)
            outputs = model.eval_forward(batch)
            assert (outputs['logits'] is None) == fused
            for metric in metrics.values():
                model.update_metric(batch, outputs, metric)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


@pytest.mark.parametrize('teacher_kinds,kwargs', [
    (['qwen2'], {'alpha': 0.5, 'temperature': 2.0, 'divergence': 'jsd'}),
    (['gpt2-tied', 'llama'], {'alpha': 0.2, 'ensemble': 'logits'}),
    ([], {'alpha': 1.0}),
])
def test_fused_eval_metrics_equal_the_logits_metrics(teacher_kinds: list[str], kwargs: dict) -> None:
    got, want = _eval_metrics(True, teacher_kinds, **kwargs), _eval_metrics(False, teacher_kinds, **kwargs)
    assert set(got) == set(want) and len(want) == (4 if teacher_kinds else 2)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-9), name


def test_fused_top1_agreement_counts_agreeing_tokens() -> None:
    from composer_kd.losses.fused_stats import fused_token_sums
    student, labels = _head(H, V, 1), _labels()
    teacher = LinearHead(student.hidden, student.weight * 2.0)  # the same argmax everywhere
    sums = fused_token_sums(student, labels, teachers=[teacher], chunk_elements=4 * V)
    assert int(sums['tokens']) == int((labels[:, 1:] != -100).sum()) and float(sums['top1']) == int(sums['tokens'])
    other = LinearHead(student.hidden, -student.weight)  # the argmax becomes the argmin: never the same
    assert float(fused_token_sums(student, labels, teachers=[other])['top1']) == 0.0
