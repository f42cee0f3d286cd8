"""``DistillationModel``: a Composer ``HuggingFaceModel`` whose ``model`` is the student, plus a frozen teacher."""

import logging
from typing import Any, Mapping, Optional, Sequence

import torch
from composer.models import HuggingFaceModel
from torchmetrics import Metric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from composer_kd.data.teacher_topk import topk_teacher_from_batch
from composer_kd.data.tokens import batch_labels
from composer_kd.losses import (
    TopKTeacher,
    check_distillation_args,
    distillation_loss,
    scored_positions,
    topk_distillation_loss,
)
from composer_kd.losses.fused import LinearHead, fused_distillation_loss
from composer_kd.losses.fused_stats import fused_token_sums
from composer_kd.losses.liger import liger_distillation_loss, liger_refusal
from composer_kd.losses.stats import distillation_stat_sums, per_sample_losses, rollout_stat_sums
from composer_kd.model.flops import forward_flops, matmul_params
from composer_kd.model.frozen_teachers import FrozenTeachers
from composer_kd.model.fsdp import prepare_for_fsdp
from composer_kd.model.generation import no_fsdp2_input_casts
from composer_kd.model.head_tap import HeadTap
from composer_kd.model.hidden_state_taps import HiddenStateDistillation
from composer_kd.model.metrics import (
    ChunkedLanguageCrossEntropy,
    ChunkedLanguagePerplexity,
    TeacherDivergenceLoss,
    TeacherTop1Agreement,
    update_from_fused_outputs,
)
from composer_kd.model.vocab import shared_vocab_size

__all__ = ['DistillationModel']

log = logging.getLogger(__name__)

# Batches of Composer's and LLM Foundry's in-context-learning evaluators: scored on the student alone.
_ICL_MODES = ('icl_task', 'generate')

# 'teacher.': checkpoints of versions that held one teacher under that name.
_TEACHER_PREFIXES = ('teachers.', 'teacher.')


def _language_metrics() -> dict[str, Metric]:
    return {'LanguageCrossEntropy': ChunkedLanguageCrossEntropy(), 'LanguagePerplexity': ChunkedLanguagePerplexity()}


class DistillationModel(HuggingFaceModel):
    """Trains a student causal LM on ``alpha·CE + (1−alpha)·T²·D(teacher‖student)`` (see ``distillation_loss``).

    The teacher may be an ensemble: a list of models whose tempered distributions are mixed (``ensemble='probs'``)
    or whose logits are averaged (``'logits'``) with ``teacher_weights`` (see ``ensemble_teacher_logits``).

    The teacher is frozen by construction: no gradients, always in eval mode (also after the Trainer calls
    ``train()``), run under ``no_grad`` on every rank for every batch, and left out of ``state_dict()`` so
    checkpoints hold the student only (and the hidden-state projections, if any); rebuild the teacher from its own
    weights when loading. Give the optimizer the parameters that require a gradient — the student's and the
    projections' — as ``composer-kd train`` does.

    Logits are cut to ``len(tokenizer)`` before the loss and metrics, which reconciles padded embeddings.

    With ``precomputed_teacher=True`` there is no teacher model: the batches carry the teacher's top-k
    (a dataset written by ``composer-kd precompute-teacher``) and the loss is ``topk_distillation_loss``.

    With ``fused_head=True`` a training step computes no logits at all: the student's and teachers' final
    hidden states meet their LM heads inside ``fused_distillation_loss``, chunk by chunk (see ``HeadTap`` for how
    the models are split). The loss and its gradients equal the logits path. Batches on which ``KDMonitor`` or
    ``PerSampleLog`` record statistics take the logits path (they need the logits); evaluation computes its
    metrics' token sums from the heads too (``fused_token_sums``).

    With ``hidden_states`` (``HiddenStateDistillation``) every training forward also keeps the outputs of the paired
    student and teacher blocks, and the loss adds ``weight`` times their distance (``loss/train/hidden``, unweighted)
    to ``total``; evaluation does not compute it.

    Args:
        student (PreTrainedModel): the causal LM to train; becomes ``self.model``.
        teacher (PreTrainedModel | Sequence[PreTrainedModel], optional): the frozen causal LM, or several (an
            ensemble); ``None`` is plain LM training (needs ``alpha=1``).
        tokenizer (PreTrainedTokenizerBase, optional): the tokenizer both models share.
        alpha (float): weight of cross-entropy on the labels. Default: ``0.5``.
        temperature (float): softmax temperature of the divergence. Default: ``1.0``.
        divergence (str): see ``composer_kd.distillation_loss``. Default: ``'forward_kl'``.
        teacher_weights (Sequence[float], optional): one positive weight per teacher, normalised to sum 1.
            Default: equal.
        ensemble (str): ``'probs'`` or ``'logits'``, how several teachers combine. Default: ``'probs'``.
        precomputed_teacher (bool): the teacher comes with the batches (``teacher_topk_ids``,
            ``teacher_topk_logprobs``, ``teacher_rest_logprob``); ``teacher`` must be ``None``. Default: ``False``.
        fused_head (bool | str): training steps apply the LM heads inside the loss, chunk by chunk, so no
            ``(B, T, V)`` logits or gradient exist. ``'liger'``: the same through Liger-Kernel's fused linear JSD
            where it computes this objective (see ``composer_kd.losses.liger``), ours otherwise, saying why once.
            Default: ``False``.
        hidden_states (HiddenStateDistillation, optional): hidden-state distillation against the (single) teacher
            model. Default: ``None``.
        **divergence_kwargs: ``beta`` (jsd) or ``lam`` (skew divergences).

    Example:
        >>> model = DistillationModel(student, teacher, tokenizer, alpha=0.5, temperature=2.0)
        >>> params = [p for p in model.parameters() if p.requires_grad]  # the student's (and projections')
        >>> trainer = Trainer(model=model, optimizers=DecoupledAdamW(params), ...)
    """

    def __init__(self,
                 student: PreTrainedModel,
                 teacher: PreTrainedModel | Sequence[PreTrainedModel] | None = None,
                 tokenizer: Optional[PreTrainedTokenizerBase] = None,
                 *,
                 alpha: float = 0.5,
                 temperature: float = 1.0,
                 divergence: str = 'forward_kl',
                 teacher_weights: Optional[Sequence[float]] = None,
                 ensemble: str = 'probs',
                 precomputed_teacher: bool = False,
                 fused_head: bool | str = False,
                 hidden_states: Optional[HiddenStateDistillation] = None,
                 **divergence_kwargs: float) -> None:
        resolved_kwargs = check_distillation_args(alpha, temperature, divergence, divergence_kwargs)
        if not (isinstance(fused_head, bool) or fused_head == 'liger'):
            raise ValueError(f'fused_head must be True, False or \'liger\', got {fused_head!r}')
        teachers = [] if teacher is None else [teacher] if isinstance(teacher, torch.nn.Module) else list(teacher)
        if precomputed_teacher and teachers:
            raise ValueError('precomputed_teacher=True takes the teacher from the batches; pass teacher=None')
        if not teachers and not precomputed_teacher and alpha != 1.0:
            raise ValueError(f'a DistillationModel without a teacher trains on labels alone and needs alpha=1, '
                             f'got alpha={alpha!r}')
        if not teachers and teacher_weights is not None:
            raise ValueError('teacher_weights without teachers')
        if hidden_states is not None and len(teachers) != 1:
            raise ValueError(f'hidden_states compares the student with one teacher model, got {len(teachers)}')
        vocab_size = shared_vocab_size(student, None, tokenizer)
        for member in teachers:
            vocab_size = min(vocab_size, shared_vocab_size(student, member, tokenizer))
        super().__init__(model=student, tokenizer=tokenizer, use_logits=True, shift_labels=True)
        # Composer's names (what LLM Foundry users monitor) on the chunked implementations.
        self.train_metrics = _language_metrics()
        self.val_metrics = _language_metrics()
        if teachers or precomputed_teacher:
            self.val_metrics['TeacherDivergenceLoss'] = TeacherDivergenceLoss(divergence, temperature, resolved_kwargs)
            self.val_metrics['TeacherTop1Agreement'] = TeacherTop1Agreement()
        # One child for all teachers: Composer makes each direct child its own FSDP root.
        self.teachers = FrozenTeachers(teachers, teacher_weights, ensemble, heads=fused_head) if teachers else None
        self._student_tap = HeadTap(student) if fused_head else None
        # A direct child too: its projections (if any) are an FSDP root of their own, checkpointed with the student.
        self.hidden_states = hidden_states
        self.fused_head = fused_head
        self._liger_fallback_said = False
        self.precomputed_teacher = precomputed_teacher
        self.vocab_size = vocab_size
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.divergence = divergence
        self.divergence_kwargs = resolved_kwargs
        # A dict while ``KDMonitor`` watches the current batch: each microbatch's loss adds its statistics.
        self.stat_sums: Optional[dict[str, torch.Tensor]] = None
        # A list while ``PerSampleLog`` records the current batch: each microbatch's loss appends its samples.
        self.sample_records: Optional[list[dict[str, torch.Tensor]]] = None
        # A dict while ``OnPolicyDistillation`` trains on sampled continuations: the logits path adds their sums.
        self.rollout_sums: Optional[dict[str, torch.Tensor]] = None
        prepare_for_fsdp(student, frozen=False)
        # Sized now: once FSDP shards the models a rank holds only its share.
        self._flops_shapes = [(matmul_params(m), m.config.num_hidden_layers, m.config.hidden_size)
                              for m in (student, *teachers)]

    def flops_per_batch(self, batch: Mapping[str, Any]) -> int:
        """Model FLOPs of one training batch (Composer's ``speed_monitor`` turns them into FLOP/s and MFU): the
        student's forward and backward (3 forwards) and each teacher model's forward (``model/flops.py``)."""
        batch_size, seq_len = batch['input_ids'].shape[:2]
        (student, *teachers) = [forward_flops(*shape, batch_size, seq_len) for shape in self._flops_shapes]
        return 3 * student + sum(teachers)

    def member_forward_flops(self, member: int, batch_size: int, seq_len: int) -> int:
        """FLOPs of one forward of the student (``member`` 0) or of teacher ``member`` over a batch (``model/flops.py``;
        ``OnPolicyDistillation`` reports its generation's cost with it)."""
        return forward_flops(*self._flops_shapes[member], batch_size, seq_len)

    def _alpha(self, batch: Mapping[str, Any]) -> float:
        """The CE weight of a batch: 0 on the student's own samples (``OnPolicyDistillation``), else ``alpha``."""
        return 0.0 if batch.get('on_policy') else self.alpha

    def set_loss_settings(self, alpha: Optional[float] = None, temperature: Optional[float] = None) -> None:
        """Changes alpha and/or the temperature of the loss (and of ``TeacherDivergenceLoss``) from the next
        forward on; ``KDSchedule`` calls it every batch.

        Raises:
            ValueError: for an invalid value, a teacher-free model given alpha < 1, or a new temperature with a
                precomputed teacher (its batches carry the rest mass at the run's temperature only).
        """
        alpha = self.alpha if alpha is None else float(alpha)
        temperature = self.temperature if temperature is None else float(temperature)
        check_distillation_args(alpha, temperature, self.divergence, self.divergence_kwargs)
        if self.teachers is None and not self.precomputed_teacher and alpha != 1.0:
            raise ValueError(f'a DistillationModel without a teacher needs alpha=1, got alpha={alpha!r}')
        if self.precomputed_teacher and temperature != self.temperature:
            raise ValueError('a precomputed teacher fixes the temperature (its rest mass is recorded at it)')
        self.alpha, self.temperature = alpha, temperature
        metric = self.val_metrics.get('TeacherDivergenceLoss')
        if metric is not None:
            metric.loss_kwargs['temperature'] = temperature

    # -- training ------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> 'DistillationModel':
        return super().train(mode)  # FrozenTeachers stays in eval mode

    def _cut(self, logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Drops logits past the shared vocabulary (padded embedding rows)."""
        if logits is None or logits.shape[-1] == self.vocab_size:
            return logits
        return logits[..., :self.vocab_size]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.hidden_states is None or not self.model.training:
            return self._forward(batch)
        with self.hidden_states.capture():
            outputs = self._forward(batch)
        outputs['hidden_states'] = self.hidden_states.take()
        return outputs

    def _forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        inputs = {'input_ids': batch['input_ids'], 'attention_mask': batch.get('attention_mask'), 'use_cache': False}
        teacher_topk = None
        if self.precomputed_teacher:
            teacher_topk = topk_teacher_from_batch(batch)
            if teacher_topk is None and self.model.training and self.alpha < 1.0:
                raise ValueError('precomputed_teacher=True needs batches with the teacher\'s top-k '
                                 '(teacher_topk_ids, ...): train on a dataset written by precompute-teacher')
        # With alpha=1 the training loss ignores the teacher; eval always runs it (for the teacher metrics).
        # Either way the decision is the same on every rank, which FSDP needs.
        run_teachers = self.teachers is not None and (self._alpha(batch) < 1.0 or not self.model.training or
                                                      self.hidden_states is not None)
        if self._fuses_this_batch():
            return self._fused_forward(batch, inputs, teacher_topk, run_teachers)
        student_logits = self.model(**inputs).logits
        teacher_logits = self.teachers(inputs, self.vocab_size, self.temperature) if run_teachers else None
        return {'logits': student_logits, 'teacher_logits': teacher_logits, 'teacher_topk': teacher_topk}

    def _fuses_this_batch(self) -> bool:
        """With a fused head every batch does, except training batches on which a callback records statistics that
        need the logits."""
        return self._student_tap is not None and (not self.model.training or
                                                  (self.stat_sums is None and self.sample_records is None))

    def _fused_forward(self, batch: Mapping[str, Any], inputs: dict[str, Any], teacher_topk: Optional[TopKTeacher],
                       run_teachers: bool) -> dict[str, Any]:
        """The teachers' hidden states and heads first, then the student's forward, whose head call returns in
        place of logits (see ``HeadTap``) the loss terms ``(1, 1, 3)`` (total, ce, kd) when training, or the eval
        metrics' token sums ``(1, 1, 4)`` (CE, divergence, top-1 agreement, tokens)."""
        assert self._student_tap is not None
        teacher_heads = self.teachers(inputs, self.vocab_size, self.temperature, heads=True) if run_teachers else []
        labels, training, alpha = batch_labels(batch), self.model.training, self._alpha(batch)
        settings = {'temperature': self.temperature, 'divergence': self.divergence, **self.divergence_kwargs}
        teacher = {'teachers': teacher_heads, 'teacher_topk': teacher_topk, 'vocab_size': self.vocab_size}
        if teacher_heads:
            teacher.update(teacher_weights=self.teachers.weights, ensemble=self.teachers.ensemble)

        def on_head(student: LinearHead) -> torch.Tensor:
            if not training:
                sums = fused_token_sums(student, labels, **teacher, **settings)
                return torch.stack([sums['ce'], sums['kd'], sums['top1'], sums['tokens'].double()]).view(1, 1, 4)
            if self._liger_qualifies(student, teacher_heads, teacher_topk, labels):
                losses = liger_distillation_loss(student, teacher_heads[0], labels, vocab_size=self.vocab_size,
                                                 alpha=alpha, **settings)
            else:
                losses = fused_distillation_loss(student, labels, alpha=alpha, **teacher, **settings)
            return torch.stack([losses['total'], losses['ce'], losses['kd']]).view(1, 1, 3)

        with self._student_tap.replace(on_head):
            out = self._student_tap.check_output(self.model(**inputs).logits)
        return {'logits': None, 'teacher_logits': None, 'teacher_topk': None,
                'loss_terms' if training else 'token_sums': out,
                'has_teacher': bool(teacher_heads) or teacher_topk is not None}

    def loss(self, outputs: dict[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The hybrid loss of a forward's ``outputs`` (``_logit_loss``), plus the hidden-state term when the forward
        kept hidden states (then dropped from ``outputs``)."""
        losses = self._logit_loss(outputs, batch)
        captured = outputs.pop('hidden_states', None)
        if captured is None:
            return losses
        hidden = self.hidden_states(*captured, batch_labels(batch))  # as a module: FSDP gathers the projections
        # Own storage for 'hidden': Composer scales each microbatch's logged losses in place.
        return {**losses, 'total': losses['total'] + self.hidden_states.weight * hidden,
                'hidden': hidden.detach().clone()}

    def _logit_loss(self, outputs: dict[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The hybrid loss of a forward's ``outputs``; then drops ``outputs['teacher_logits']``.

        The loss takes its gradient during this call, so the teacher's ``(B, T, V)`` logits — the largest
        tensor of the step — are no longer needed, and Composer would otherwise hold them through backward.
        """
        if outputs.get('loss_terms') is not None:  # the fused head computed them in the forward
            terms = outputs['loss_terms'].view(3)
            # Own storage for 'total': Composer scales each microbatch's loss in place.
            return {'total': terms[0].clone(), 'ce': terms[1].detach(), 'kd': terms[2].detach()}
        settings = {'temperature': self.temperature, 'divergence': self.divergence, **self.divergence_kwargs}
        student, labels = self._cut(outputs['logits']), batch_labels(batch)
        topk: Optional[TopKTeacher] = outputs.get('teacher_topk')
        teacher = topk if topk is not None else self._cut(outputs['teacher_logits'])
        if topk is not None:
            losses = topk_distillation_loss(student, topk.ids, topk.logprobs, labels, alpha=self._alpha(batch),
                                            teacher_rest_logprob=topk.rest_logprob, **settings)
        else:
            losses = distillation_loss(student, teacher, labels, alpha=self._alpha(batch), **settings)
        if self.stat_sums is not None and self.model.training:
            self._add_stats(student, teacher, labels, losses)
        if self.rollout_sums is not None and self.model.training and batch.get('sampler_logprobs') is not None:
            sums = rollout_stat_sums(student, teacher if isinstance(teacher, torch.Tensor) else None, labels,
                                     batch['sampler_logprobs'], batch['sampler_temperature'], self.temperature)
            for name, value in sums.items():
                self.rollout_sums[name] = self.rollout_sums.get(name, 0.0) + value
        if self.sample_records is not None and self.model.training:
            self._add_samples(student, teacher, labels, batch, settings)
        outputs['teacher_logits'] = None
        # Composer backpropagates 'total' and logs every key as loss/train/<key>.
        return {'total': losses['total'], 'ce': losses['ce'].detach(), 'kd': losses['kd'].detach()}

    def _add_stats(self, student: torch.Tensor, teacher: torch.Tensor | TopKTeacher | None, labels: torch.Tensor,
                   losses: Mapping[str, torch.Tensor]) -> None:
        """Adds a microbatch's token sums to ``stat_sums`` (``KDMonitor``)."""
        sums = distillation_stat_sums(student, teacher, labels)
        sums['ce'] = losses['ce'].detach().double() * sums['tokens']
        if teacher is not None:
            sums['kd'] = losses['kd'].detach().double() * sums['tokens']
        assert self.stat_sums is not None
        for name, value in sums.items():
            self.stat_sums[name] = self.stat_sums[name] + value if name in self.stat_sums else value

    def _add_samples(self, student: torch.Tensor, teacher: torch.Tensor | TopKTeacher | None, labels: torch.Tensor,
                     batch: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
        """Appends a microbatch's per-sample terms to ``sample_records`` (``PerSampleLog``)."""
        if batch.get('sample_id') is None:
            raise ValueError('per-sample tracking needs batches with sample_id (TokenDataset gives it; under LLM Foundry '
                             'the composer_kd_tokens or composer_kd_precomputed loader, not text)')
        values = per_sample_losses(student, teacher, labels, **settings)
        assert self.sample_records is not None
        self.sample_records.append({'sample_id': batch['sample_id'].detach().cpu(), **values})

    def _liger_qualifies(self, student: LinearHead, teachers: list[LinearHead], topk: Optional[TopKTeacher],
                         labels: torch.Tensor) -> bool:
        """With ``fused_head='liger'``: whether Liger computes this batch's loss; says once why not."""
        if self.fused_head != 'liger':
            return False
        reason = liger_refusal(student, teachers, topk, self.divergence, labels, self.divergence_kwargs)
        if reason is not None and not self._liger_fallback_said:
            log.warning('fused_head=liger: using composer-kd\'s fused loss instead of Liger\'s because of %s', reason)
            self._liger_fallback_said = True
        return reason is None

    # -- metrics -------------------------------------------------------------------------------------------
    def eval_forward(self, batch: Mapping[str, Any], outputs: Optional[Any] = None) -> Any:
        if batch.get('mode') in _ICL_MODES:  # in-context-learning evaluation: the student alone, as HuggingFaceModel
            return super().eval_forward(batch, outputs if outputs is not None else self._student_logits(batch))
        return outputs if outputs is not None else self.forward(batch)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The student's ``generate`` (Composer's ``HuggingFaceModel.generate``), with FSDP2's forward-input cast off:
        it would copy the KV cache each step (``model/generation.py``)."""
        with no_fsdp2_input_casts(self.model):
            return super().generate(input_ids, **kwargs)

    def _student_logits(self, batch: Mapping[str, Any]) -> Optional[dict[str, torch.Tensor]]:
        """The student's logits of an ``icl_task`` batch (a ``generate`` batch generates instead)."""
        if batch.get('mode') == 'generate':
            return None
        return {'logits': self.model(input_ids=batch['input_ids'], attention_mask=batch.get('attention_mask')).logits}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> Any:
        if batch.get('mode') in _ICL_MODES:  # the labels eval_forward kept, and the metric's own update
            return super().update_metric(batch, outputs, metric)
        labels = batch_labels(batch)
        if outputs.get('logits') is None:  # the fused head: token sums instead of logits
            update_from_fused_outputs(metric, outputs, scored_positions(labels).sum())
            return
        # Targets aligned with the logits: position t is scored against labels[t+1]; the last is unscored.
        targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        student_logits = self._cut(outputs['logits'])
        if isinstance(metric, (TeacherDivergenceLoss, TeacherTop1Agreement)):
            teacher = outputs.get('teacher_topk') if self.precomputed_teacher else self._cut(outputs['teacher_logits'])
            if teacher is None:
                raise ValueError(f'{type(metric).__name__} needs the teacher: evaluate on data precomputed by the '
                                 'same teacher (precompute-teacher), or leave the teacher metrics out')
            metric.update(student_logits, teacher, targets)
        else:
            metric.update(student_logits, targets)

    # -- checkpoints: the student only ---------------------------------------------------------------------
    def _whole_model(self) -> bool:
        """Composer clears ``should_save_peft_only`` while it broadcasts rank 0's weights to ranks built on
        ``meta`` (FSDP2 ``sync_module_states``, ``init_device: mixed``): then the teachers travel too. Composer's
        public ``LoadCheckpoint`` callback clears it as well, to load a checkpoint: ``load_state_dict`` therefore
        loads teachers only from a state that holds them. A private signal of Composer's (``get_full_state_dict``
        in ``composer/distributed/prepare_distributed.py``): ``tests/test_dependency_internals.py`` says so by name
        when an upgrade moves it."""
        return self.should_save_peft_only is False

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = '', keep_vars: bool = False) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._whole_model():
            return state
        for key in [k for k in state if k.startswith(tuple(prefix + p for p in _TEACHER_PREFIXES))]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        # Keep torch's signature: torch.distributed.checkpoint calls it with keywords (FSDP2 autoresume).
        if self._whole_model() and any(k.startswith(_TEACHER_PREFIXES) for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        student_state = {k: v for k, v in state_dict.items() if not k.startswith(_TEACHER_PREFIXES)}
        result = super().load_state_dict(student_state, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(_TEACHER_PREFIXES)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f'Error(s) in loading state_dict for {type(self).__name__}: '
                               f'missing keys {missing}, unexpected keys {result.unexpected_keys}')
        result.missing_keys[:] = missing
        return result
