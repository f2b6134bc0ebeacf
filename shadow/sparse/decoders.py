"""The decoders: greedy decoding that reads only the kept weights, each the plain loop of ``loop.decode`` with a
step that asks a kept-units object (``kept``) what to read: per token under a predictor's masks, per request under
fixed ones, or under TEAL's and CATS' thresholds."""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import partial

import torch
from torch import Tensor, nn

from shadow.arch import Shape
from shadow.offload import input_device
from shadow.policy import Masks, Policy
from shadow.predictors import GriffinMasks, Predictor
from shadow.sparse.kept import FixedUnits, PredictedUnits, ThresholdedChannels
from shadow.sparse.loop import Generation, PromptCache, decode, prompt_pass, stored_transposed
from shadow.sparse.pruning import pruned, pruned_groups
from shadow.sparse.steps import ModelParts, ThresholdStep, UnitStep
from shadow.thresholds import reads, thresholded
from shadow.weights_read import masks_read, weights_read


def _masks_applied(steps: list[Masks], layers: int) -> Masks:
    empty = torch.zeros(0, layers, 0, dtype=torch.bool)
    return Masks(torch.stack([m.heads for m in steps]).cpu() if steps else empty,
                 torch.stack([m.neurons for m in steps]).cpu() if steps else empty)


class TokenDecoder:
    """Greedy decoding with per-token masks, reading only the kept units' weights at each step.

    The prompt runs densely. At every decoding step the predictor runs where its features appear: ShadowLLM's once,
    on layer 0's attention output; DejaVu-style ones at every layer (with ``lookahead``, layer l's reads layer l −
    1's). A layer whose mask is not yet known when it starts computes all its heads. Its features are its output
    projection's input, pruned heads zeroed. Keys and values of a head at positions where it was pruned are computed
    when it is next kept, from the cached attention input, so each head attends to exactly the keys and values of
    the masked model, whose pruned heads still write their cache.

    A batch of B prompts of one length decodes together: each layer keeps the union of the units the requests'
    masks keep, so every kept weight is read once for the batch, and each request's output is the masked model's
    under that union mask. The union grows with B (B = 8 untrained predictors keep nearly every unit), which is
    how per-token sparsity's gain shrinks with batch size.

    A step reads nothing back from the device (with the compiled or Triton kernels; torch's sparse kernels size
    their patterns on the host): tokens stay on the device until the end, and the kept units' indices come from a
    sort of the mask with lengths the host knows. Under a local policy it knows them in advance; under a global or
    hybrid one they depend on the scores, so each predictor run reads its layers' counts once (one read per token
    for ShadowLLM's single predictor). With query-head units and grouped-query attention, how many key-value groups
    the kept query heads fall in varies too: under a local policy the step computes the keys and values of as many
    groups as it keeps query heads (at most all), the groups in use first, which is correct for any extra group.

    A static step launches the same kernels with the same arguments at every position: the position is a device
    tensor the kernels read, the row gathers that fill the KV cache launch over its whole length (programs past the
    position return at once) and the new keys' rotation loops up to it. On CUDA a static step is captured once as a CUDA
    graph and replayed for every later token, which removes the launch overhead of its hundreds of small kernels.
    That needs the kept counts known in advance (a local policy, a batch of one: a batch's union varies), the
    Triton kernels, and the model and predictor on one GPU with nothing offloaded; under a global or hybrid policy
    the step runs eagerly, its launches sized by the position.
    """

    def __init__(self, model: nn.Module, predictor: Predictor, policy: Policy, static: bool | None = None,
                 dense_key_values: bool = False):
        """``predictor.shape`` says the attention unit its head masks address. ``static``: run static steps (see
        the class), captured as CUDA graphs on CUDA, run as they are elsewhere (that is how the tests check them on
        the CPU); by default, wherever a CUDA graph can capture them. ``dense_key_values``: compute every head's
        key and value at every step by the dense projections, as Polar Sparsity does, instead of the kept heads'
        with catch-up (the same outputs; ``share_read`` counts the key and value projections whole)."""
        if len(predictor.groups) > 1 and policy.name != "local":
            raise ValueError(f"policy={policy.name}: per-token execution selects each layer's units when its own "
                             "predictor runs, so only policy=local applies to per-layer predictors")
        for feature_layer, targets in predictor.groups:
            if min(targets) < feature_layer:
                raise ValueError(f"predictor.layer={feature_layer}: per-token execution needs every layer's mask "
                                 f"before the layer runs, and layer {min(targets)} runs first; use layer=0")
        self.model, self.static = model, static
        parts = ModelParts(model)
        self.step = UnitStep(parts, predictor.shape, PredictedUnits(predictor.shape, predictor, policy),
                             dense_key_values)

    def column_layout(self) -> AbstractContextManager:
        """The projections read by columns stored transposed for the block (``loop.stored_transposed``), so that
        several generations share one re-layout; ``generate`` does it itself otherwise."""
        return stored_transposed(UnitStep.column_modules(self.step.parts))

    def generate(self, input_ids: Tensor, new_tokens: int) -> Generation:
        """Greedily continue a batch of (B, T) prompts, all of length T, by ``new_tokens`` tokens."""
        static = self.step.static(len(input_ids), self.static)
        with self.column_layout():
            tokens, logits, steps = decode(self.model, input_ids, new_tokens, partial(prompt_pass, self.model),
                                           self.step, static, catch_up=not self.step.dense_key_values)
        return Generation(tokens, logits, masks=_masks_applied(steps, self.step.shape.layers))

    def share_read(self, generation: Generation) -> float:
        """The share of the dense step's weights a step of this generation read, on average."""
        return masks_read(self.model, generation.masks, whole=self.step.parts.family.kv_rows
                          if self.step.dense_key_values else ())


class RequestDecoder:
    """Greedy decoding with one mask per request, chosen before the prompt runs (ShadowLLM's or DejaVu-style
    predictors' per-request masks, or a fixed one; GRIFFIN's come from the prompt's own pass, which runs whole):
    the prompt runs on ``pruned``'s smaller layers, then every step
    reads only the kept units' weights in place with ``TokenDecoder``'s step, without predictors and with the same
    units at every step: the bytes of the smaller layers, without Hugging Face's per-step work. Its steps are
    static, batches too, so on CUDA one is captured as a CUDA graph and replayed (with the Triton kernels, the
    model on one GPU).

    A batch keeps the union of its requests' masks, in the prompt and at every step: each request's output is the
    masked model's under that union mask."""

    def __init__(self, model: nn.Module, shape: Shape, static: bool | None = None):
        """``shape`` says the attention unit the masks address; ``static`` as for ``TokenDecoder``."""
        self.model, self.shape, self.static = model, shape, static
        self.parts = ModelParts(model)

    def column_layout(self) -> AbstractContextManager:
        """As ``TokenDecoder.column_layout``."""
        return stored_transposed(UnitStep.column_modules(self.parts))

    def generate(self, input_ids: Tensor, new_tokens: int, masks: Masks | GriffinMasks | None = None) -> Generation:
        """Greedily continue a batch of (B, T) prompts by ``new_tokens`` tokens under ``masks``: heads (B or 1, L,
        H) and neurons (B or 1, L, F) in ``shape``'s units, chosen before the prompt runs; or GRIFFIN's, chosen in
        the prompt's own pass, which runs on the whole model (its order: only the generated tokens run on the kept
        units)."""
        prompt = None
        if isinstance(masks, GriffinMasks):
            with masks.recording(torch.ones_like(input_ids, device=input_device(self.model))) as statistics:
                prompt = prompt_pass(self.model, input_ids)
            masks = masks.policy.select(*statistics())
        layers, shape = self.shape.layers, self.shape
        if (masks is None or masks.heads.dim() != 3 or masks.heads.shape[1:] != (layers, shape.heads)
                or masks.neurons.shape[1:] != (layers, shape.neurons)
                or {masks.heads.shape[0], masks.neurons.shape[0]} - {1, len(input_ids)}):
            got = "none" if masks is None else f"heads {tuple(masks.heads.shape)}, neurons {tuple(masks.neurons.shape)}"
            raise ValueError(f"RequestDecoder.generate takes each request's masks, heads (B or 1, {layers}, "
                             f"{shape.heads}) and neurons (B or 1, {layers}, {shape.neurons}) for B = "
                             f"{len(input_ids)} prompts; got {got}")
        union = Masks(masks.heads.bool().any(0, keepdim=True), masks.neurons.bool().any(0, keepdim=True))
        # one read of the kept counts per generation; the steps then know every size in advance
        step = UnitStep(self.parts, shape, FixedUnits(shape, union, input_device(self.model)))
        with self.column_layout():
            tokens, logits, steps = decode(self.model, input_ids, new_tokens,
                                           (lambda ids: self._pruned_prompt(ids, union)) if prompt is None
                                           else lambda ids: prompt, step,
                                           step.static(len(input_ids), self.static), catch_up=True)
        return Generation(tokens, logits, masks=_masks_applied(steps, layers))

    def _pruned_prompt(self, input_ids: Tensor, union: Masks) -> tuple[Tensor, PromptCache]:
        """The prompt on the smaller layers of ``pruned`` (the kept key-value groups' cache rows), its cache then
        laid out for every group, as the steps address it."""
        with pruned(self.model, union, self.shape):
            logits, kept_cache = prompt_pass(self.model, input_ids)
        full_cache = []
        for index, (keys, values) in enumerate(kept_cache):
            groups = pruned_groups(self.shape, union.heads[0, index])[1].to(keys.device)
            keys, values = (x.new_zeros(x.shape[0], self.shape.kv_heads, *x.shape[2:]).index_copy_(1, groups, x)
                            for x in (keys, values))
            full_cache.append((keys, values))
        return logits, full_cache

    def share_read(self, generation: Generation) -> float:
        """As ``TokenDecoder.share_read``."""
        return masks_read(self.model, generation.masks)


class ThresholdDecoder:
    """Greedy decoding under TEAL's, WINA's or CATS' thresholds (``shadow.thresholds``), each step reading only the
    weights of the channels it keeps. The prompt runs under the thresholds too, so the generation is the
    thresholded model's.

    At each step TEAL zeroes each site's entries below its threshold (WINA: those whose magnitude times their
    weight column's norm is below it) and reads only the kept channels' columns of the projections the site feeds
    (all of them stored transposed). CATS computes the FFN input projection (gate; OPT's up) whole, zeroes the
    activations below its threshold and reads only the kept units' up rows and down columns; its attention is
    dense. Every head is computed at every step.

    A batch zeroes each request's own small entries and reads, per site, the columns of the channels any of its
    requests keeps. With Triton's kernels the products test their inputs themselves and the shares kept are summed
    on the device (see ``ThresholdStep``): nothing is read back, so on CUDA the steps are captured as CUDA graphs.
    """

    def __init__(self, model: nn.Module, method: str, thresholds: Tensor, static: bool | None = None):
        """``thresholds``: (sites, L), as ``Histograms.thresholds`` gives them for ``method`` (teal, wina or cats);
        ``static`` as for ``TokenDecoder``."""
        self.model, self.method, self.static = model, method, static
        self.step = ThresholdStep(ModelParts(model), ThresholdedChannels(model, method, thresholds))

    def column_layout(self) -> AbstractContextManager:
        """As ``TokenDecoder.column_layout``."""
        return stored_transposed(self.step.column_modules())

    def generate(self, input_ids: Tensor, new_tokens: int) -> Generation:
        """Greedily continue a batch of (B, T) prompts, all of length T, by ``new_tokens`` tokens."""
        with self.column_layout():
            tokens, logits, steps = decode(self.model, input_ids, new_tokens, self._thresholded_prompt, self.step,
                                           self.step.static(len(input_ids), self.static), catch_up=False)
        kept = torch.stack(steps).cpu() if steps else torch.zeros(0, *self.step.channels.thresholds.shape)
        return Generation(tokens, logits, kept=kept)

    def _thresholded_prompt(self, input_ids: Tensor) -> tuple[Tensor, PromptCache]:
        with thresholded(self.model, self.method, self.step.channels.thresholds):
            return prompt_pass(self.model, input_ids)

    def share_read(self, generation: Generation) -> float:
        """As ``TokenDecoder.share_read``."""
        return weights_read(self.model, *reads(self.model, self.method, generation.kept.mean(0)))
