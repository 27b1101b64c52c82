"""MHIM-MIL: multiple instance learning with masked hard instance mining.

Version 1: Tang et al., "Multiple Instance Learning Framework with Masked Hard Instance Mining for Whole
Slide Image Classification", ICCV 2023. Version 2: Tang et al., "Multiple Instance Learning Framework with
Masked Hard Instance Mining for Gigapixel Histopathology Image Analysis", 2025.

Attention MIL learns from the few instances that make a bag easy and neglects the hard ones. MHIM-MIL hides
the most salient instances from the student, so it must learn the rest: a momentum teacher (the same
architecture, started from a trained baseline of the student, no gradient, updated only by EMA of the
student) scores every instance of the bag, and the student sees only what the masks keep (gathered, never
padded). One training step on a bag of N instances:

1. The teacher (eval mode) runs on all N instances. Instance scores: version 1 uses its attention; version 2
   the class-aware instance probability, the task's ``instance_saliency`` of the teacher's head applied to
   each instance's share of the bag embedding, W (a_i h_i) + b (the bag logit is the sum of these shares
   plus the bias, so this asks how strongly instance i alone pushes the prediction). Classification:
   max_c softmax_c, the paper's score; it ranks instances by how decisively they point to any class.
   Survival and regression have no classes, so the task generalises the score by what drives its output:
   survival ranks by the instance's risk (1 - mean survival for the discrete-time NLL, sigmoid of the log
   relative risk for Cox), regression by its standardised value through a sigmoid (sTIL-rich tiles raise
   the slide score). In all three the masked instances are those the teacher's prediction rests on, which
   is what "salient" means in the paper; only the ranking matters for the masks.
2. Masks (:func:`plan_masks`): k = N h instances, drawn at random from the top ceil(k / hr), are masked
   (h decays to 0 along a cosine over the run when ``high_decay``; N h is rounded stochastically, so
   small bags lose one instance with probability N h rather than always, see :func:`high_mask_count`);
   optionally the low-score mask takes the lowest ``low_ratio`` N and the random mask ``random_ratio`` of
   what is left (the v1 paper's 0.2 and 0.5; off by default, as they lost on small bags), sparing the
   teacher's top ``keep_top`` instances. At least one instance is always kept. Version 2 then shuffles the
   unmasked instances, keeps ``merge_ratio`` of them and hands the others to the global recycle network
   (:class:`GlobalRecycle`): k global query tokens cross-attend (8 heads) over those dropped instances
   and the k outputs are appended to the kept instances. The queries are buffers pulled towards their
   outputs by EMA, never by gradient; the attention projections learn by gradient with the student.
3. The student embeds the kept (and recycled) instances only, aggregates them and its logits get the task
   loss; ``aux_loss`` = lambda * soft-target cross-entropy between softmax(z_teacher / 0.1) and
   log_softmax(z_student / 1.0) over the bag embeddings (the teacher sees the whole bag).
4. After the optimiser step (``after_step``): theta_t <- m theta_t + (1 - m) theta_s, with m optionally
   raised to 1 along a cosine.

Inference (``forward``) is the student alone on all instances, so a checkpoint predicts and paints
heatmaps like its plain student; the teacher and recycle network ride along in the state dict so that a
killed run resumes exactly. Masking and recycling work on the student's instance embeddings, as in the
authors' code: students expose an embedding and an aggregation half (:func:`embed_instances`,
:func:`pool_instances`), which ABMIL (plain and gated) and TransMIL do.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from pathmil.errors import PathmilError
from pathmil.models.abmil import ABMIL, ABMILConfig, GatedABMILConfig
from pathmil.models.base import MILModel, MILOutput
from pathmil.models.registry import model_entry, register_model
from pathmil.models.transmil import TransMIL, TransMILConfig
from pathmil.settings import Settings

log = logging.getLogger(__name__)


class MHIMConfig(Settings):
    """MHIM-MIL settings, the ``mhim`` section of a training run with an ``mhim_*`` aggregator.

    Masked hard instance mining (Tang et al., ICCV 2023 = version 1; the 2025 extension = version 2): a
    momentum teacher ranks the instances of a bag and masks the most salient ones, so the student learns
    from the hard rest. Both versions default to the high-score mask alone: v1's low-score (0.2) and random
    (0.5) masks cost it single witnesses and share regression on small bags and gained nowhere over the
    high mask alone (benchmarks/RESULTS.md, "Which of MHIM-MIL v1's masks"); set them to run the paper's v1.
    """

    section = "mhim"
    version: Literal[1, 2] = Field(
        2, description="1: teacher attention, random + low + high masks; 2: class-aware score, recycling"
    )
    teacher_init: str | None = Field(
        None, description="best.pt of the plain student trained on the same fold and features"
    )
    student_init: Literal["none", "embed", "all"] = Field(
        "none",
        description="copy from teacher_init into the student: none, embed (the instance embedding), all",
    )
    momentum: float = Field(
        0.9999, ge=0, le=1, description="teacher EMA after every step: theta_t <- m theta_t + (1 - m) theta_s"
    )
    momentum_cosine: bool = Field(False, description="raise the momentum to 1 along a cosine over the run")
    high_ratio: float = Field(
        0.01, ge=0, lt=1, description="h: share of the bag masked from the top of the ranking"
    )
    high_random: float = Field(
        0.5,
        gt=0,
        le=1,
        description="hr: the N h masked are drawn from the top ceil(N h / hr); 1 masks the top N h",
    )
    high_decay: bool = Field(True, description="cosine decay of h from high_ratio to 0 over the run")
    high_rounding: Literal["stochastic", "ceil"] = Field(
        "stochastic",
        description="N h masked: stochastic (expected share h) or ceil (the authors': at least 1 always)",
    )
    low_ratio: float = Field(
        0.0, ge=0, lt=1, description="share masked from the bottom of the ranking (the v1 paper: 0.2)"
    )
    random_ratio: float = Field(
        0.0, ge=0, lt=1, description="share of the rest masked at random (the v1 authors' ABMIL: 0.5)"
    )
    keep_top: int = Field(
        0,
        ge=0,
        description="the teacher's top keep_top instances are hidden only by the high mask (the low and "
        "random masks spare them, v2's merge keeps them first)",
    )
    merge_ratio: float = Field(
        0.8, gt=0, le=1, description="v2: share of the unmasked instances the student sees as they are"
    )
    n_recycle_tokens: int = Field(
        1, ge=1, description="v2: k global queries recycling the other 1 - merge_ratio (paper: 1, 5, 10)"
    )
    recycle_heads: int = Field(8, ge=1, description="v2: heads of the recycling cross-attention")
    recycle_momentum: float = Field(
        0.9998, ge=0, le=1, description="v2: EMA momentum of the global queries towards their outputs"
    )
    consistency_weight: float = Field(0.1, ge=0, description="lambda of the teacher-student consistency loss")
    teacher_temperature: float = Field(0.1, gt=0, description="sharpening of the teacher's bag embedding")
    student_temperature: float = Field(1.0, gt=0, description="temperature of the student's bag embedding")

    @field_validator("low_ratio", "random_ratio", mode="before")
    @classmethod
    def _none_is_zero(cls, value: Any) -> Any:
        # checkpoints of pathmil before 2026-12-02 hold None ("the version's default", then v1 0.2 and 0.5);
        # masks act in training only, so their models predict the same
        return 0.0 if value is None else value

    @model_validator(mode="after")
    def _student_init_needs_teacher(self) -> MHIMConfig:
        if self.student_init != "none" and not self.teacher_init:
            raise ValueError("mhim.student_init needs mhim.teacher_init (the baseline checkpoint to copy)")
        return self


# ------------------------------------------------------------------------------------------ students


def check_student(student: MILModel) -> None:
    """Refuse a student without the two halves masking needs."""
    if not isinstance(student, ABMIL | TransMIL):
        raise PathmilError(f"MHIM-MIL cannot wrap {type(student).__name__}; use ABMIL or TransMIL as student")


def embed_instances(student: MILModel, x: torch.Tensor) -> torch.Tensor:
    """The student's per-instance embedding (B, N, D) -> (B, N, H), the part masking can skip."""
    check_student(student)
    return student.embed(x)


def pool_instances(student: MILModel, h: torch.Tensor) -> MILOutput:
    """The student's aggregation of embedded instances ``h`` (B, N, H), all of them real."""
    check_student(student)
    return student.aggregate(h)


# ------------------------------------------------------------------------------------------ masking


@dataclass
class MaskPlan:
    """Instance indices of one bag: what the student sees, what each mask took, what v2 recycles."""

    keep: torch.Tensor  # ascending
    high: torch.Tensor
    low: torch.Tensor
    random: torch.Tensor
    recycle: torch.Tensor


def _ceil(value: float) -> int:
    """ceil that ignores floating-point dust (100 * 0.07 = 7.000000000000001)."""
    return math.ceil(value - 1e-9)


def high_mask_count(n: int, high_ratio: float, rounding: str = "stochastic") -> int:
    """How many of ``n`` instances the high-score mask hides: N h rounded, never all of them.

    ``stochastic``: floor(N h), plus one with probability frac(N h) (torch's RNG), so the expected share is
    h whatever the bag's size. ``ceil``: ceil(N h), as the authors' code, which masks at least one instance
    of every bag while h > 0: on bags of fewer than 1 / h instances that is always the teacher's top one,
    the only witness of a single-witness bag (benchmarks/RESULTS.md, MIL quality).
    """
    exact = n * high_ratio
    if rounding == "ceil":
        count = _ceil(exact)
    else:
        whole = math.floor(exact + 1e-9)
        count = whole + int(float(torch.rand(())) < exact - whole)
    return max(0, min(count, n - 1))


def plan_masks(
    scores: torch.Tensor,
    high_ratio: float,
    high_random: float = 1.0,
    low_ratio: float = 0.0,
    random_ratio: float = 0.0,
    merge_ratio: float = 1.0,
    high_rounding: str = "stochastic",
    keep_top: int = 0,
) -> MaskPlan:
    """The masks of one bag from the teacher's instance ``scores`` (N,); random draws use torch's RNG.

    High: k = N h rounded (:func:`high_mask_count`) instances drawn at random from the top ceil(k / hr)
    (``ceil`` rounding: the top ceil(N h / hr), as the authors' code).
    Low: the lowest floor(N l) of the rest. Random: floor(share * rest) of what remains. The teacher's top
    ``keep_top`` instances are spared by the low and random masks and kept first by the merge (only the
    high mask, at its ratio, hides them): with one witness among 20-50 instances a 50 % random mask hides
    it in half the steps of a positive bag. Every mask shrinks so that one instance stays. Version 2's
    merge: of the unmasked instances a random ceil(merge_ratio * n) stay (at least one) and the others
    are to be recycled.
    """
    n = scores.numel()
    device = scores.device
    order = torch.argsort(scores, descending=True)
    n_high = high_mask_count(n, high_ratio, high_rounding)
    top = n * high_ratio if high_rounding == "ceil" else n_high  # the authors' pool: the top ceil(N h / hr)
    pool = min(n, max(n_high, _ceil(top / high_random)))
    high = order[:pool][torch.randperm(pool, device=device)[:n_high]]
    rest = order[~torch.isin(order, high)]  # still ranked, best first
    spared = torch.isin(rest, order[:keep_top])
    kept_top, rest = rest[spared], rest[~spared]
    floor = 0 if len(kept_top) else 1  # what the low and random masks leave of the rest
    n_low = max(0, min(int(n * low_ratio + 1e-9), len(rest) - floor))
    low, rest = rest[len(rest) - n_low :], rest[: len(rest) - n_low]
    rest = rest[torch.randperm(len(rest), device=device)]
    n_random = max(0, min(int(len(rest) * random_ratio + 1e-9), len(rest) - floor))
    random, rest = rest[:n_random], torch.cat([kept_top, rest[n_random:]])
    n_keep = max(1, _ceil(len(rest) * merge_ratio))
    keep, recycle = rest[:n_keep], rest[n_keep:]
    return MaskPlan(keep=keep.sort().values, high=high, low=low, random=random, recycle=recycle)


# --------------------------------------------------------------------------------------- recycling


class GlobalRecycle(nn.Module):
    """MHIM-MIL v2's global recycle network: k global queries compress the dropped instances.

    Multi-head cross-attention from the queries (k, H) over the dropped instances' embeddings gives k
    tokens that join the kept instances, so randomly dropped key instances are not lost. The queries are
    shared across bags and follow the attention outputs by EMA in training (q <- m q + (1 - m) out, the
    mean over the batch), never by gradient; the projections learn by gradient.
    """

    def __init__(self, dim: int, n_tokens: int, heads: int, momentum: float):
        super().__init__()
        if dim % heads:
            raise PathmilError(
                f"MHIM recycle network: the student's embedding width {dim} is not divisible by "
                f"mhim.recycle_heads={heads}; choose a divisor of {dim}"
            )
        self.momentum = momentum
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        # unit-scale random queries: near-equal queries would attend alike and collapse into one token
        self.register_buffer("queries", torch.randn(n_tokens, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Dropped instances ``h`` (B, M, H) with M >= 1 -> recycled tokens (B, k, H)."""
        queries = self.queries.clone().to(h.dtype).expand(h.shape[0], -1, -1)
        tokens, _ = self.attention(queries, h, h, need_weights=False)
        if self.training:
            with torch.no_grad():
                self.queries.lerp_(tokens.detach().float().mean(dim=0), 1 - self.momentum)
        return tokens


def consistency_loss(
    teacher: torch.Tensor, student: torch.Tensor, teacher_temperature: float, student_temperature: float
) -> torch.Tensor:
    """Soft-target cross-entropy between softmax(teacher / t_t) and log_softmax(student / t_s), per bag
    over the embedding dimensions, averaged over bags (the sharp teacher target as in DINO)."""
    target = torch.softmax(teacher.float() / teacher_temperature, dim=-1)
    log_probs = torch.log_softmax(student.float() / student_temperature, dim=-1)
    return -(target * log_probs).sum(dim=-1).mean()


def max_class_probability(logits: torch.Tensor) -> torch.Tensor:
    """The classification saliency, for wrappers built without a task."""
    return torch.softmax(logits, dim=-1).amax(dim=-1)


# ------------------------------------------------------------------------------------------ the wrapper


class MHIM(MILModel):
    """Teacher-student MHIM-MIL around ``student`` (see the module docstring)."""

    def __init__(
        self,
        student: MILModel,
        student_name: str,
        settings: MHIMConfig,
        saliency: Callable[[torch.Tensor], torch.Tensor] | None = None,
        load_baseline: Callable[[str], Any] | None = None,
    ):
        super().__init__(student.in_dim, student.n_outputs)
        check_student(student)
        self.student_name, self.settings = student_name, settings
        self.saliency = saliency or max_class_probability
        self._load_baseline = load_baseline
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval()
        width = student.classifier.in_features
        s = settings
        self.recycle = (
            GlobalRecycle(width, s.n_recycle_tokens, s.recycle_heads, s.recycle_momentum)
            if s.version == 2
            else None
        )
        self.register_buffer("progress", torch.zeros(()))  # share of the run done (schedules, resume)

    # ------------------------------------------------------------------------------ set-up

    def output_tensors(self) -> list[str]:
        """The student's and the teacher's heads (the recycling tokens are task-agnostic)."""
        return [f"{who}.{n}" for who in ("student", "teacher") for n in self.student.output_tensors()]

    def train(self, mode: bool = True) -> MHIM:
        super().train(mode)
        self.teacher.eval()  # the teacher scores without dropout, always
        return self

    def prepare_training(self) -> None:
        """A new run: start the teacher (and per ``student_init`` the student) from the baseline."""
        self.load_baseline()

    def load_baseline(self) -> None:
        """Initialise the teacher (and per ``student_init`` the student) from ``settings.teacher_init``."""
        path = self.settings.teacher_init
        if not path:
            log.warning(
                "MHIM-MIL expects a teacher from a trained baseline (--set mhim.teacher_init=RUN/best.pt "
                "of `pathmil train --aggregator %s`); without it the teacher starts as the untrained student",
                self.student_name,
            )
            return
        if self._load_baseline is None:
            raise RuntimeError("MHIM-MIL needs load_baseline (pathmil.training.run.build_model passes it)")
        baseline = self._load_baseline(path)  # as predict and heatmaps load a run: one loader, same checks
        found = (baseline.aggregator, baseline.in_dim, baseline.task.n_outputs)
        wanted = (self.student_name, self.in_dim, self.n_outputs)
        if found != wanted:
            raise PathmilError(
                f"mhim.teacher_init {path} holds model '{found[0]}' for {found[1]}-d features and "
                f"{found[2]} outputs, but the teacher must be model '{wanted[0]}' for {wanted[1]}-d "
                f"features and {wanted[2]} outputs; train that baseline on the same features and task first"
            )
        try:
            self.teacher.load_state_dict(baseline.model.state_dict())
        except RuntimeError as err:
            detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise PathmilError(
                f"mhim.teacher_init {path}: its {found[0]} architecture differs from the student's "
                f"({detail}); use the baseline's model settings {baseline.config.model}"
            ) from None
        if self.settings.student_init != "none":
            state = self.teacher.state_dict()
            if self.settings.student_init == "embed":
                state = {k: v for k, v in state.items() if k.startswith("encoder.")}
            self.student.load_state_dict(state, strict=self.settings.student_init == "all")
        log.info("MHIM-MIL teacher initialised from %s", path)

    # ---------------------------------------------------------------------------- schedules

    def momentum(self) -> float:
        """The teacher's EMA momentum now: constant, or raised to 1 along a cosine."""
        m = self.settings.momentum
        if not self.settings.momentum_cosine:
            return m
        return 1 - (1 - m) * (1 + math.cos(math.pi * float(self.progress))) / 2

    def high_ratio(self) -> float:
        """The high-score mask ratio now: constant, or decayed to 0 along a cosine."""
        h = self.settings.high_ratio
        return h * (1 + math.cos(math.pi * float(self.progress))) / 2 if self.settings.high_decay else h

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher from the student: theta_t <- m theta_t + (1 - m) theta_s."""
        self.progress.fill_(min(1.0, step / max(1, total_steps)))
        m = self.momentum()
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            teacher.mul_(m).add_(student.detach(), alpha=1 - m)
        for teacher, student in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
            teacher.copy_(student)

    # ------------------------------------------------------------------------------ passes

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Inference: the student alone, on every instance."""
        return self.student(x, mask)

    @torch.no_grad()
    def teacher_scores(self, teacher_out: MILOutput) -> torch.Tensor:
        """The teacher's instance ranking (B, N): attention (v1) or class-aware probability (v2)."""
        if self.settings.version == 1:
            return teacher_out.instance_scores
        shares = teacher_out.instance_scores[..., None] * teacher_out.instance_embeddings
        return self.saliency(self.teacher.classifier(shares).float())

    def training_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Teacher scores, masks, student on the kept instances, consistency loss (one bag at a time)."""
        if x.shape[0] == 1 and (mask is None or bool(mask.all())):
            return self._train_bag(x)
        outputs = [
            self._train_bag(x[b, mask[b]][None] if mask is not None else x[b : b + 1]) for b in range(len(x))
        ]
        scores = x.new_zeros(x.shape[:2])
        for b, out in enumerate(outputs):
            scores[b, mask[b] if mask is not None else slice(None)] = out.instance_scores[0]
        return MILOutput(
            logits=torch.cat([o.logits for o in outputs]),
            embedding=torch.cat([o.embedding for o in outputs]),
            instance_scores=scores,
            aux_loss=torch.stack([o.aux_loss for o in outputs]).mean(),
        )

    def _train_bag(self, x: torch.Tensor) -> MILOutput:
        s = self.settings
        with torch.no_grad():
            teacher_out = self.teacher(x)
        plan = plan_masks(
            self.teacher_scores(teacher_out)[0],
            self.high_ratio(),
            s.high_random,
            s.low_ratio,
            s.random_ratio,
            s.merge_ratio if self.recycle is not None else 1.0,
            s.high_rounding,
            s.keep_top,
        )
        n_keep = len(plan.keep)
        h = embed_instances(self.student, x[:, torch.cat([plan.keep, plan.recycle])])
        if len(plan.recycle):
            h = torch.cat([h[:, :n_keep], self.recycle(h[:, n_keep:])], dim=1)
        out = pool_instances(self.student, h)
        consistency = consistency_loss(
            teacher_out.embedding, out.embedding, s.teacher_temperature, s.student_temperature
        )
        scores = out.instance_scores.new_zeros(x.shape[:2])
        scores[0, plan.keep] = out.instance_scores[0, :n_keep]
        return MILOutput(
            logits=out.logits,
            embedding=out.embedding,
            instance_scores=scores,
            aux_loss=s.consistency_weight * consistency,
        )


# ---------------------------------------------------------------------------------------- registry


def build_mhim(
    name: str,
    in_dim: int,
    n_outputs: int,
    settings: Settings,
    mhim: dict[str, Any] | MHIMConfig | None = None,
    saliency: Callable[[torch.Tensor], torch.Tensor] | None = None,
    load_baseline: Callable[[str], Any] | None = None,
) -> MHIM:
    """MHIM-MIL ``name`` around its student built with ``settings`` (the ``model`` section); ``mhim`` holds
    the masking settings, ``saliency`` the task's instance score (version 2) and ``load_baseline`` the
    loader of the baseline run (``pathmil.training.run.load_run``)."""
    mhim_settings = mhim if isinstance(mhim, MHIMConfig) else MHIMConfig.build(mhim)
    student_name = model_entry(name).wraps
    student = model_entry(student_name).build(in_dim, n_outputs, settings)
    return MHIM(student, student_name, mhim_settings, saliency, load_baseline)


@register_model(
    "mhim_abmil", settings=ABMILConfig, wraps="abmil", inputs=("mhim", "saliency", "load_baseline")
)
def mhim_abmil(in_dim: int, n_outputs: int, settings: ABMILConfig, **inputs: Any) -> MHIM:
    return build_mhim("mhim_abmil", in_dim, n_outputs, settings, **inputs)


@register_model(
    "mhim_abmil_gated",
    settings=GatedABMILConfig,
    wraps="abmil_gated",
    inputs=("mhim", "saliency", "load_baseline"),
)
def mhim_abmil_gated(in_dim: int, n_outputs: int, settings: GatedABMILConfig, **inputs: Any) -> MHIM:
    return build_mhim("mhim_abmil_gated", in_dim, n_outputs, settings, **inputs)


@register_model(
    "mhim_transmil", settings=TransMILConfig, wraps="transmil", inputs=("mhim", "saliency", "load_baseline")
)
def mhim_transmil(in_dim: int, n_outputs: int, settings: TransMILConfig, **inputs: Any) -> MHIM:
    return build_mhim("mhim_transmil", in_dim, n_outputs, settings, **inputs)
