"""TRACER's distillation terms, transcribed as the authors' code computes them (HesamAsad/TRACER).

A literal re-statement, in the same torch ops, of what one TRACER step computes from the
student's and the teacher's outputs, so that tests compare robustft's losses with it to 1e-12 in
float64. Sources (read at the repository's HEAD, 1f1e612):

- ``clip/model.py`` ``CLIP.forward``: both towers return ``x / x.norm(dim=-1, keepdim=True)``
  (no epsilon) and ``logit_scale.exp()``; that is what the loss code receives.
- ``src/models/clip_knowledge_distillation.py`` ``CLIPKnowledgeDistillation``: the views, built
  from those (already normalised) features; ``nn.KLDivLoss(reduction='batchmean')``,
  ``nn.MSELoss()`` (mean over every entry), ``nn.CrossEntropyLoss()`` (mean over rows);
  ``normalize_features`` is ``F.normalize(x, dim=-1)`` (eps 1e-12).
- ``src/models/tracer_loss.py``: the teacher's outputs come from ``teacher_enc.moving_avg`` under
  ``torch.no_grad()`` (so the teacher side is a constant); the fallback ``dist_loss`` (used only
  when every ``alpha_*`` is 0) with ``distillation_temperature`` on the teacher only; the
  monitoring KL of ``calculate_teacher_statistics`` with its ``log(p + 1e-8)``.
- ``src/models/beta_moving_average.py`` ``GeneralMovingAverage`` / ``create_beta_weight_function``.

Nothing here is imported by the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor


def clip_output(x: Tensor) -> Tensor:
    """What ``CLIP.forward`` hands the loss: the feature over its norm (no epsilon)."""
    return x / x.norm(dim=-1, keepdim=True)


def _batchmean_kl(log_input: Tensor, target: Tensor) -> Tensor:
    """``nn.KLDivLoss(reduction='batchmean')(log_input, target)``."""
    return F.kl_div(log_input, target, reduction="batchmean")


class Outputs:
    """One step's student and teacher outputs as TRACER's loss code sees them."""

    def __init__(
        self, s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor, s_scale: Tensor, t_scale
    ) -> None:
        self.s_img, self.s_txt = clip_output(s_img), clip_output(s_txt)
        with torch.no_grad():  # teacher_enc.moving_avg(...) runs under no_grad
            self.t_img, self.t_txt = clip_output(t_img), clip_output(t_txt)
        self.s_scale, self.t_scale = s_scale, t_scale
        # CLIPKnowledgeDistillation.forward: logits from the features as received
        self.t_logits_img = t_scale * self.t_img @ self.t_txt.T
        self.t_logits_txt = self.t_logits_img.T
        self.s_logits_img = s_scale * self.s_img @ self.s_txt.T
        self.s_logits_txt = self.s_logits_img.T


def crd(o: Outputs) -> Tensor:
    """``contrastive_relational_distillation``: batchmean KL per direction, averaged."""
    img = _batchmean_kl(F.log_softmax(o.s_logits_img, dim=1), F.softmax(o.t_logits_img, dim=1))
    txt = _batchmean_kl(F.log_softmax(o.s_logits_txt, dim=1), F.softmax(o.t_logits_txt, dim=1))
    return (img + txt) / 2


def fd(o: Outputs) -> Tensor:
    """``feature_distillation``: MSE (mean over batch x dim) of re-normalised features, summed."""
    img = F.mse_loss(F.normalize(o.s_img, dim=-1), F.normalize(o.t_img, dim=-1))
    txt = F.mse_loss(F.normalize(o.s_txt, dim=-1), F.normalize(o.t_txt, dim=-1))
    return img + txt


def icl(o: Outputs) -> Tensor:
    """``interactive_contrastive_learning``: CE of student rows vs teacher columns, labels arange."""
    labels = torch.arange(o.s_img.shape[0])  # kd_labels in tracer_loss.py
    s_img, s_txt = F.normalize(o.s_img, dim=-1), F.normalize(o.s_txt, dim=-1)
    t_img, t_txt = F.normalize(o.t_img, dim=-1), F.normalize(o.t_txt, dim=-1)
    img = F.cross_entropy(o.s_scale * s_img @ t_txt.T, labels)  # the student's scale
    txt = F.cross_entropy(o.s_scale * s_txt @ t_img.T, labels)
    return (img + txt) / 2


def cross_kd(o: Outputs) -> Tensor:
    """``cross_knowledge_distillation``: cross logits (student scale) vs the teacher's logits."""
    s_img, s_txt = F.normalize(o.s_img, dim=-1), F.normalize(o.s_txt, dim=-1)
    t_img, t_txt = F.normalize(o.t_img, dim=-1), F.normalize(o.t_txt, dim=-1)
    x = F.log_softmax(o.s_scale * s_img @ t_txt.T, dim=1)
    y = F.log_softmax(o.s_scale * s_txt @ t_img.T, dim=1)
    img = _batchmean_kl(x, F.softmax(o.t_logits_img, dim=1))
    txt = _batchmean_kl(y, F.softmax(o.t_logits_txt, dim=1))
    return (img + txt) / 2


def temp_distil(o: Outputs, temperature: float) -> Tensor:
    """``compute_temperature_scaled_distillation`` (alpha_temp_distil; 0 in every script)."""
    t_img = F.softmax(o.t_logits_img / temperature, dim=1)
    t_txt = F.softmax(o.t_logits_txt / temperature, dim=1)
    img = _batchmean_kl(F.log_softmax(o.s_logits_img, dim=1), t_img)
    txt = _batchmean_kl(F.log_softmax(o.s_logits_txt, dim=1), t_txt)
    return (img + txt) / 2


def total_kd(o: Outputs, *, crd_w: float, fd_w: float, icl_w: float, cross_w: float) -> Tensor:
    """``total_kd_loss`` of the four views the scripts switch on (MFD, GD, AFD at 0)."""
    return crd_w * crd(o) + fd_w * fd(o) + icl_w * icl(o) + cross_w * cross_kd(o)


def basic_dist_loss(o: Outputs, temperature: float = 1.0) -> Tensor:
    """``dist_loss`` of tracer_loss.py (only when no ``alpha_*`` is set): summed directions' CE.

    The student's logits are those of ``ClipLoss`` (``s * img @ txt.T`` and ``s * txt @ img.T``);
    the teacher's are divided by ``distillation_temperature`` (the student's are not).
    """
    s_img = o.s_scale * o.s_img @ o.s_txt.T
    s_txt = o.s_scale * o.s_txt @ o.s_img.T
    t_img = o.t_scale * o.t_img @ o.t_txt.T / temperature
    t_txt = o.t_scale * o.t_txt @ o.t_img.T / temperature
    per_row = F.softmax(t_img, dim=1) * F.log_softmax(s_img, dim=1) + F.softmax(
        t_txt, dim=1
    ) * F.log_softmax(s_txt, dim=1)
    return -torch.sum(per_row, dim=1).mean()


def monitored_kl(o: Outputs) -> Tensor:
    """``teacher_student_kl_combined`` of calculate_teacher_statistics (with its 1e-8)."""
    p_img, p_txt = F.softmax(o.s_logits_img, dim=1), F.softmax(o.s_logits_txt, dim=1)
    q_img, q_txt = F.softmax(o.t_logits_img, dim=1), F.softmax(o.t_logits_txt, dim=1)
    kl_img = F.kl_div(torch.log(p_img + 1e-8), q_img, reduction="batchmean")
    kl_txt = F.kl_div(torch.log(p_txt + 1e-8), q_txt, reduction="batchmean")
    return (kl_img + kl_txt) / 2


def general_moving_average(
    trajectory: list[Tensor], beta: float, total_iterations: int
) -> list[Tensor]:
    """``GeneralMovingAverage`` updated after every step (``ema_up_freq <= 0``): the teachers.

    ``trajectory[0]`` is the copied (pre-trained) model, ``trajectory[k]`` the parameters after
    optimiser step ``k``; returns the average after each update (float64, as given).
    """
    pdf = stats.beta(beta, beta).pdf

    def weight(iteration: int) -> float:
        return float(pdf((iteration + 0.5) / (total_iterations + 1)))

    avg = trajectory[0].clone()
    weight_sum = weight(0)
    out = []
    for it, param in enumerate(trajectory[1:], start=1):
        w = weight(it)
        relative = w / weight_sum
        avg = (avg + relative * param) / (1 + relative)
        weight_sum += w
        out.append(avg.clone())
    return out
