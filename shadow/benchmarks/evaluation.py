"""Cost of masked evaluation against dense evaluation at the same batch size, through lm-eval.

    python -m shadow.benchmarks.evaluation                    # opt-mini, its next-sentence task, CPU
    python -m shadow.benchmarks.evaluation --model facebook/opt-1.3b --device cuda --limit 200

Rows, each scoring the same log-likelihood requests (every choice of ``--limit`` questions):
  HFLM                   lm-eval's own model, dense;
  shadow, dense          our scoring loop with no masks;
  shadow, masks only     50% masks through the hooks, without predicting them (the masking overhead);
  shadow, predicted      50% masks predicted per request by a ShadowLLM predictor (masking + predictor).
Times are medians of ``torch.utils.benchmark`` measurements; ratios are against ``shadow, dense``.
"""

from __future__ import annotations

import argparse

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import get_task_dict
from torch.utils import benchmark

from shadow.arch import family_of
from shadow.compose import compose_config
from shadow.data import load_tasks
from shadow.evaluate.tasks import SparseHFLM
from shadow.opt_mini import MODEL_DIR
from shadow.placements import PLACEMENTS
from shadow.policy import Policy, SparsityMeter
from shadow.predictors import PredictedMasks, Predictor, StaticMasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--task", default="opt_mini_nextsent")
    parser.add_argument("--limit", type=int, default=64, help="questions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=10.0)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    manager, _ = load_tasks([args.task], None, 0, "eval")
    task = get_task_dict([args.task], manager)[args.task]
    task.build_all_requests(limit=args.limit, rank=0, world_size=1)
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    requests = [((ctx, cont), *plain._encode_pair(ctx, cont)) for ctx, cont in (i.args for i in task.instances)]

    cfg = compose_config()
    shape = family_of(model.config).shape(model.config, cfg.attention_unit)
    policy = Policy("global", 0.5, 0.5)
    torch.manual_seed(0)
    settings = cfg.predictor
    groups = PLACEMENTS["shadow"].groups(shape.layers, 0, False)
    predictor = Predictor.configured(shape, shape.attention_width, groups, settings, False)
    predicted = PredictedMasks(model, predictor, policy, 1, settings.granularity)
    fixed = StaticMasks(torch.rand(shape.layers, shape.heads), torch.rand(shape.layers, shape.neurons), policy)
    rows = {"HFLM": plain,
            "shadow, dense": SparseHFLM(model, tokenizer, lambda r: None, args.batch_size, SparsityMeter()),
            "shadow, masks only": SparseHFLM(model, tokenizer, fixed, args.batch_size, SparsityMeter()),
            "shadow, predicted": SparseHFLM(model, tokenizer, predicted, args.batch_size, SparsityMeter())}
    times = {}
    for name, lm in rows.items():
        timer = benchmark.Timer(stmt="lm._loglikelihood_tokens(requests, disable_tqdm=True)",
                                globals={"lm": lm, "requests": requests}, num_threads=torch.get_num_threads())
        times[name] = timer.blocked_autorange(min_run_time=args.min_run_time).median * 1e3
    print(f"{args.task}: {len(requests)} requests, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'evaluation':<22}{'ms':>10}{'× dense':>10}")
    for name, ms in times.items():
        print(f"{name:<22}{ms:>10.1f}{ms / times['shadow, dense']:>10.2f}")


if __name__ == "__main__":
    main()
