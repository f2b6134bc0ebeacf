"""Sparse execution: the pruned units' (or zeroed channels') weights are not read at all. Outputs equal the masked
(or thresholded) model's (tested).

Per request, ``pruned(model, masks, shape)`` swaps, for the duration of a block, each layer's projections for
smaller ones that hold only the kept units' weights, gathered once: the query, key and value rows and the output
projection's columns of the kept key-value groups (so the KV cache holds only those), and the rows (gate, up) and
columns (down) of the kept FFN units; the model family names the projections of each role. Prefill and every
decoding step then run on the smaller layers. ``RequestDecoder`` decodes under per-request masks faster: the
prompt on those smaller layers, then every step with ``TokenDecoder``'s step on the same kept units, reading them
in place.

Per token, ``TokenDecoder`` decodes greedily with a fresh mask at every step, as DejaVu does, and copies no weights:
the gather kernels of ``shadow.kernels`` read the kept rows (query, key, value, gate, up) and the kept columns
(output, down: stored transposed) in place; the family's ``decode_step`` is the model's forward for one token per
request of a batch, the decoder supplying each layer's attention and FFN. Copying the kept weights at every step
would cost more than the dense product.

Under TEAL's or CATS' thresholds, ``ThresholdDecoder`` decodes the same way, each step reading only the columns of
the input channels kept (TEAL) or the up rows and down columns of the FFN units kept (CATS).

By concern: ``pruning`` (per request, the smaller layers), ``loop`` (the decoding loop, its KV cache, CUDA-graph
capture and the columns' re-layout), ``kept`` (what a step keeps: fixed units, predicted units, thresholded
channels), ``steps`` (the steps that read only those) and ``decoders`` (the three decoders, each the loop with a
step).
"""

from shadow.sparse.decoders import RequestDecoder, ThresholdDecoder, TokenDecoder
from shadow.sparse.loop import Generation
from shadow.sparse.pruning import pruned

__all__ = ["Generation", "RequestDecoder", "ThresholdDecoder", "TokenDecoder", "pruned"]
