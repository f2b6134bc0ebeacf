"""Predictor placements, the ``predictor`` config group: each option, conf/predictor/<name>.yaml, is a
``Placement`` registered here under that name. A placement says whether it scores the calibration set, which
networks it trains (its groups: the layer each reads and the layers it predicts) and how it turns the job into a
mask source; the job (``run.mask_source``), the disk and memory estimates, per-token decoding and the latency
bench ask it rather than its name.

- ``shadow`` (ShadowLLM): one predictor reads the attention output of ``predictor.layer`` (0 by default) at the
  last context token and predicts every layer's head and FFN-unit importance.
- ``dejavu`` (DejaVu-style, as ShadowLLM ran it): one predictor per layer, reading that layer's own attention
  output from a dense pass, or the previous layer's with ``predictor.lookahead=true``.
- ``static``: one mask for every input, from importance averaged over the calibration set.
- ``oracle``: the criterion's own scores on each request, the upper bound of any predictor.
- ``dense``: no mask.
- ``teal`` and ``cats``: training-free, no mask per request: magnitude thresholds per layer, calibrated on the
  dense model, zero small activations at every token (``shadow.thresholds``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from omegaconf import DictConfig
from torch import nn

from shadow.arch import Shape
from shadow.config import PredictorConfig
from shadow.criteria import Criterion
from shadow.evaluate.requests import MaskFn
from shadow.policy import Policy
from shadow.predictors import (
    GriffinMasks,
    Groups,
    LayerScales,
    OracleMasks,
    PredictedMasks,
    Predictor,
    StaticMasks,
    static_importance,
)
from shadow.traces import TraceShards

PLACEMENTS: dict[str, Placement] = {}


@dataclass
class MaskJob:
    """What a placement may build its mask source from: ``traces`` when it ``uses_traces``, ``predictor`` when it
    trains one."""

    model: nn.Module
    criterion: Criterion
    shape: Shape
    policy: Policy
    predictor_cfg: PredictorConfig | DictConfig  # the job's ``predictor`` config
    pad_id: int
    seed: int
    layer_scale: str = "calibrated"  # the job's: how scores of different layers are compared (config.LAYER_SCALES)
    traces: TraceShards | None = None
    predictor: Predictor | None = None


class Placement(ABC):
    """A predictor placement; a subclass that sets ``name`` registers under it."""

    name: str
    uses_traces = False  # scores the calibration set (cached traces)
    trains = False  # trains predictor networks: ``groups`` are not empty
    thresholds = False  # zeroes small activations by calibrated thresholds (its name is a shadow.thresholds method)
    ranks = True  # its masks rank units by the job's criterion
    dense_attention = False  # keeps every head unless head_sparsity is set (GRIFFIN prunes the FFN alone)
    context = "masked"  # how evaluation runs a request's context (eval.context=auto): under its mask, or "dense"

    def method(self, criterion: str, granularity: str) -> str:
        """How results name what made their masks: "shadow per token, plainact", "teal", "dense"."""
        per_token = " per token" if granularity == "token" else ""
        return f"{self.name}{per_token}, {criterion}" if self.ranks else self.name

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):  # an intermediate class (Trained) names no option
            PLACEMENTS[cls.name] = cls()

    def groups(self, layers: int, layer: int, lookahead: bool) -> Groups:
        """The networks it trains: (feature layer, the layers it predicts) each; none for untrained placements."""
        return ()

    def computed_whole(self, layers: int, layer: int, lookahead: bool) -> tuple[set[int], set[int]]:
        """With per-token masks, the layers that run before their mask is known: those whose every head's query,
        key and value are computed first (a network reads the layer's attention output and predicts the layer
        itself), and those that run whole (predicted from a later layer)."""
        groups = self.groups(layers, layer, lookahead)
        return ({feature for feature, targets in groups if feature in targets},
                {target for feature, targets in groups for target in targets if target < feature})

    @abstractmethod
    def masks(self, job: MaskJob) -> MaskFn:
        """The mask source: requests → one ``Masks`` per request (None: dense)."""


class Dense(Placement):
    name = "dense"
    ranks = False

    def masks(self, job: MaskJob) -> MaskFn:
        return lambda requests: None


class Oracle(Placement):
    name = "oracle"

    def masks(self, job: MaskJob) -> MaskFn:
        how = "global" if job.layer_scale == "calibrated" else job.predictor_cfg.target_norm  # its own scale
        return OracleMasks(job.model, job.criterion, job.shape, job.policy, how, job.pad_id, job.seed)


class Static(Placement):
    name = "static"
    uses_traces = True

    def masks(self, job: MaskJob) -> MaskFn:
        how = job.predictor_cfg.target_norm
        scales = LayerScales.of(job.traces) if how == "per_layer" and job.layer_scale == "calibrated" else None
        return StaticMasks(*static_importance(job.traces, how, scales), job.policy)


class Trained(Placement):
    """A placement of trained predictors: masks from their predictions, per request or per token."""

    uses_traces = True
    trains = True

    def masks(self, job: MaskJob) -> MaskFn:
        return PredictedMasks(job.model, job.predictor, job.policy, job.pad_id, job.predictor_cfg.granularity)


class ShadowLLM(Trained):
    name = "shadow"

    def groups(self, layers: int, layer: int, lookahead: bool) -> Groups:
        return ((layer, tuple(range(layers))),)


class DejaVu(Trained):
    name = "dejavu"

    def groups(self, layers: int, layer: int, lookahead: bool) -> Groups:
        return tuple((max(target - 1, 0) if lookahead else target, (target,)) for target in range(layers))


class Griffin(Placement):
    """GRIFFIN: each request's FFN units chosen from its prompt's own activations (``GriffinMasks``), with no
    calibration and no predictor; attention dense unless ``head_sparsity`` asks otherwise. Its prompt runs on the
    whole model (the pass its statistic comes from), so evaluation runs each request's context dense and only the
    positions that predict scored tokens under its mask."""

    name = "griffin"
    ranks = False
    dense_attention = True
    context = "dense"  # its prompt runs on the whole model; only the tokens after it on the kept units

    def masks(self, job: MaskJob) -> MaskFn:
        return GriffinMasks(job.model, job.shape, job.policy, job.pad_id)


class Thresholded(Placement):
    """A training-free placement: no mask per request; the job runs the model under magnitude thresholds
    calibrated on the dense model (``shadow.thresholds``)."""

    thresholds = True
    ranks = False

    def masks(self, job: MaskJob) -> MaskFn:
        return lambda requests: None


class Teal(Thresholded):
    name = "teal"


class Wina(Thresholded):
    name = "wina"


class Cats(Thresholded):
    name = "cats"
