"""Generation latency of sparse execution per request: dense, static, ShadowLLM and DejaVu-style, side by side.

    python -m shadow.benchmarks.latency                                  # OPT-1.3B architecture, CPU, fp32
    python -m shadow.benchmarks.latency --arch opt-6.7b --device cuda --dtype float16 --new-tokens 128

Random weights (timing does not depend on them, as in the paper). Batch 1, a ``--prompt``-token prompt, then
``--new-tokens`` greedy tokens. Each method predicts one mask per request and runs prefill and decoding on the
kept units only (``shadow.sparse.pruned``):
  dense      no sparsity;
  static     one fixed mask, no predictor, its weights gathered once before timing;
  shadow     one predictor reading layer 0's attention output at the last prompt token;
  dejavu     one predictor per layer, reading every layer's attention output from a dense pass over the prompt.
Reported: end-to-end ms (median of ``torch.utils.benchmark``), ms per generated token, the speed-up over
dense, and the share of the time spent predicting the mask.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from shadow.models import DTYPES, Shape
from shadow.policy import Policy
from shadow.predictors import Predictor, placement_groups
from shadow.sparse import pruned
from shadow.traces import layer_features

ARCHS = {  # hidden, layers, heads (FFN = 4 × hidden)
    "opt-125m": (768, 12, 12), "opt-350m": (1024, 24, 16), "opt-1.3b": (2048, 24, 32),
    "opt-2.7b": (2560, 32, 32), "opt-6.7b": (4096, 32, 32), "opt-13b": (5120, 40, 40), "opt-30b": (7168, 48, 56),
}


def build(arch: str, device: str, dtype: torch.dtype):
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads = ARCHS[arch]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       ffn_dim=4 * hidden, word_embed_proj_dim=hidden, vocab_size=50272,
                       max_position_embeddings=2048)
    with torch.device(device):
        return OPTForCausalLM(config).to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="opt-1.3b", choices=sorted(ARCHS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--min-run-time", type=float, default=20.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.arch, args.device, DTYPES[args.dtype])
    shape = Shape.of(model.config)
    policy = Policy("global", args.sparsity, args.sparsity)
    ids = torch.randint(4, 50000, (1, args.prompt), device=args.device)
    attention = torch.ones_like(ids)
    last = torch.tensor([args.prompt - 1])
    predictors = {name: Predictor(shape, model.config.hidden_size, placement_groups(name, shape.layers))
                  .to(args.device).eval() for name in ("shadow", "dejavu")}
    static = policy.select(torch.rand(1, shape.layers, shape.heads), torch.rand(1, shape.layers, shape.neurons))
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                "pad_token_id": 1}

    def predict(name: str):
        predictor = predictors[name]
        features = layer_features(model, ids, attention, last, predictor.feature_layers).to(args.device)
        return policy.select(*(x.cpu() for x in predictor(features)))

    def generate(name: str) -> None:
        with torch.no_grad():
            if name in ("dense", "static"):
                model.generate(ids, **settings)
                return
            with pruned(model, predict(name)):
                model.generate(ids, **settings)

    def measure(fn) -> float:
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
        return timer.blocked_autorange(min_run_time=args.min_run_time).median * 1e3

    print(f"{args.arch} architecture, {args.dtype} on {args.device}, batch 1, prompt {args.prompt} + "
          f"{args.new_tokens} generated, sparsity {args.sparsity}, {torch.get_num_threads()} threads")
    print(f"{'method':<10}{'total ms':>12}{'ms/token':>12}{'× dense':>10}{'predictor':>12}")
    dense = measure(lambda: generate("dense"))
    print(f"{'dense':<10}{dense:>12.1f}{dense / args.new_tokens:>12.2f}{1.0:>10.2f}{'-':>12}", flush=True)
    with pruned(model, static):
        total = measure(lambda: generate("static"))
    print(f"{'static':<10}{total:>12.1f}{total / args.new_tokens:>12.2f}{dense / total:>10.2f}{'-':>12}", flush=True)
    for name in ("shadow", "dejavu"):
        total = measure(lambda n=name: generate(n))
        share = measure(lambda n=name: predict(n)) / total
        print(f"{name:<10}{total:>12.1f}{total / args.new_tokens:>12.2f}{dense / total:>10.2f}{share:>11.1%}",
              flush=True)


if __name__ == "__main__":
    main()
