"""Generation latency of real sparse execution: dense, static, ShadowLLM and DejaVu-style, side by side.

    python -m shadow.benchmarks.latency                                   # OPT-1.3B architecture, CPU, fp32
    python -m shadow.benchmarks.latency arch=opt-6.7b device=cuda dtype=float16 sparsity=[0.3,0.5,0.7]
    python -m shadow.benchmarks.latency --config-dir sweeps --config-name paper_latency   # a sweep

Settings: conf/latency.yaml (Hydra, so ``-m`` sweeps and launchers work as for ``python -m shadow``).

Random weights and untrained predictors (timing does not depend on them, as in the paper). Batch 1, a
``prompt``-token prompt, then ``new_tokens`` greedy tokens. Rows, at each sparsity of heads and neurons
(local policy: every layer keeps the same share):
  dense             Hugging Face ``generate``, no sparsity;
  static  request   one fixed mask, no predictor; its kept weights gathered once before timing;
  shadow  request   one predictor reads layer 0's attention output at the last prompt token; the kept weights
                    are gathered, then prefill and decoding run on the smaller layers (``shadow.sparse.pruned``);
  dejavu  request   one predictor per layer, on every layer's attention output of a dense pass over the prompt;
  shadow  token     dense prompt, then at every step the predictor runs after layer 0 and each layer reads only
                    the kept rows in place (``shadow.sparse.TokenDecoder``);
  dejavu  token     the same with one predictor per layer, each reading the previous layer's attention output.
Reported (medians of ``torch.utils.benchmark``): end-to-end ms, ms to the first token, ms per decoding step
(end-to-end minus first token, over the remaining steps), decoding speed-up over dense, and the predictor's share
of the time: of the request's time per request, of each decoding step per token. Written to the job's directory
as latency.csv, latency.md and latency.json, and logged to W&B as a table (offline without a key; logger=none
turns it off).
"""

from __future__ import annotations

import csv
import io
import json
import platform
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils import benchmark

from shadow.cli import fail, fix_argv
from shadow.config import ConfigError
from shadow.models import DTYPES, Shape
from shadow.policy import Policy
from shadow.predictors import Predictor, placement_groups
from shadow.sparse import TokenDecoder, pruned
from shadow.traces import layer_features

ARCHS = {  # hidden, layers, heads (FFN = 4 × hidden)
    "opt-125m": (768, 12, 12), "opt-350m": (1024, 24, 16), "opt-1.3b": (2048, 24, 32),
    "opt-2.7b": (2560, 32, 32), "opt-6.7b": (4096, 32, 32), "opt-13b": (5120, 40, 40), "opt-30b": (7168, 48, 56),
    "opt-66b": (9216, 64, 72),
}
COLUMNS = ["method", "granularity", "sparsity", "total_ms", "first_token_ms", "step_ms", "decode_speedup",
           "predictor_share"]


def build(arch: str, device: str, dtype: torch.dtype):
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads = ARCHS[arch]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       ffn_dim=4 * hidden, word_embed_proj_dim=hidden, vocab_size=50272,
                       max_position_embeddings=2048, do_layer_norm_before=arch != "opt-350m")
    with torch.device(device):
        return OPTForCausalLM(config).to(dtype).eval()


def median_ms(fn, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


class Bench:
    """One random-weight model, its prompt and untrained predictors of both placements; ``rows`` times them."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        torch.manual_seed(0)
        self.model = build(cfg.arch, str(cfg.device), DTYPES[cfg.dtype])
        self.shape = Shape.of(self.model.config)
        hidden = self.model.config.hidden_size
        self.ids = torch.randint(4, 50000, (1, cfg.prompt), device=cfg.device)
        self.predictors = {
            "shadow": Predictor(self.shape, hidden, placement_groups("shadow", self.shape.layers)),
            "dejavu": Predictor(self.shape, hidden, placement_groups("dejavu", self.shape.layers, lookahead=True)),
        }
        for predictor in self.predictors.values():
            predictor.to(cfg.device, DTYPES[cfg.dtype]).eval()

    def generate(self, new_tokens: int) -> None:
        self.model.generate(self.ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=1)

    def predict_request(self, name: str, policy: Policy):
        predictor = self.predictors[name]
        last = torch.tensor([self.cfg.prompt - 1])
        features = layer_features(self.model, self.ids, torch.ones_like(self.ids), last, predictor.feature_layers)
        return policy.select(*(x.cpu() for x in predictor(features.to(self.cfg.device))))

    def predict_step(self, name: str, policy: Policy) -> None:
        """What one decoding step spends on predictors: every group on one position's features."""
        predictor = self.predictors[name]
        feature = torch.randn(1, self.model.config.hidden_size, device=self.cfg.device)
        for group in range(len(predictor.groups)):
            policy.select(*predictor.group_scores(group, feature))

    def row(self, method: str, granularity: str, sparsity: float, run, predict=None, dense_step=None) -> dict:
        """Time ``run(n)`` for all new tokens and for the first; ``predict``: the predictor's work per request
        (request) or per decoding step (token); ``dense_step``: dense ms per step, None for the dense row."""
        cfg, new = self.cfg, self.cfg.new_tokens
        quick = max(cfg.min_run_time / 4, 1.0)
        with torch.no_grad():
            total, first = median_ms(lambda: run(new), cfg.min_run_time), median_ms(lambda: run(1), quick)
            step = (total - first) / max(new - 1, 1)
            cost = median_ms(predict, quick) if predict else None
        share = None if cost is None else cost / (step if granularity == "token" else total)
        result = {"method": method, "granularity": granularity, "sparsity": sparsity, "total_ms": total,
                  "first_token_ms": first, "step_ms": step, "decode_speedup": (dense_step or step) / step,
                  "predictor_share": share}
        print(format_row(result), flush=True)
        return result

    def rows(self, sparsity: float, dense_step: float) -> list[dict]:
        policy = Policy("local", sparsity, sparsity)
        rows = []

        def row(method: str, granularity: str, run, predict=None) -> dict:
            return self.row(method, granularity, sparsity, run, predict, dense_step)

        static = policy.select(torch.rand(1, self.shape.layers, self.shape.heads),
                               torch.rand(1, self.shape.layers, self.shape.neurons))
        with pruned(self.model, static):
            rows.append(row("static", "request", self.generate))
        for name in ("shadow", "dejavu"):
            def request(n: int, name=name) -> None:
                with pruned(self.model, self.predict_request(name, policy)):
                    self.generate(n)
            rows.append(row(name, "request", request, lambda name=name: self.predict_request(name, policy)))
        for name in ("shadow", "dejavu"):
            with TokenDecoder(self.model, self.predictors[name], policy) as decoder:
                rows.append(row(name, "token", lambda n, d=decoder: d.generate(self.ids, n),
                                lambda name=name: self.predict_step(name, policy)))
        return rows


def format_row(r: dict) -> str:
    share = f"{r['predictor_share']:.1%}" if r["predictor_share"] is not None else "-"
    return (f"| {r['method']} | {r['granularity']} | {r['sparsity']:.0%} | {r['total_ms']:.0f} | "
            f"{r['first_token_ms']:.0f} | {r['step_ms']:.1f} | {r['decode_speedup']:.2f}× | {share} |")


def write(out: Path, header: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    markdown = "\n".join([header, "", TABLE_HEAD, *map(format_row, rows)]) + "\n"
    for name, text in (("latency.csv", table.getvalue()), ("latency.md", markdown),
                       ("latency.json", json.dumps({"setting": header, "rows": rows}, indent=1) + "\n")):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


TABLE_HEAD = ("| method | masks | sparsity | total ms | first token ms | ms / step | decode × dense | predictor |\n"
              "|---|---|---|---|---|---|---|---|")


def check(cfg: DictConfig) -> None:
    """One-line errors for bad settings, before the model is built."""
    if cfg.arch not in ARCHS:
        raise ConfigError(f"arch={cfg.arch} is not an OPT architecture here; use one of {', '.join(ARCHS)}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype} is unknown; use one of {', '.join(DTYPES)}")
    for s in cfg.sparsity:
        if not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ConfigError(f"sparsity={list(cfg.sparsity)} holds {s!r}; each sparsity must be a number in [0, 1)")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but no CUDA device is visible; use device=cpu")


def run(cfg: DictConfig, out: Path) -> list[dict]:
    check(cfg)
    bench = Bench(cfg)
    device = str(cfg.device)
    machine = (torch.cuda.get_device_name(device) if device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    header = (f"{cfg.arch} architecture (random weights), {cfg.dtype} on {device} ({machine}), torch "
              f"{torch.__version__}, batch 1, prompt {cfg.prompt} + {cfg.new_tokens} generated")
    print(header + "\n\n" + TABLE_HEAD, flush=True)
    dense = bench.row("dense", "-", 0.0, bench.generate)
    rows = [dense]
    for sparsity in cfg.sparsity:
        rows += bench.rows(float(sparsity), dense["step_ms"])
    write(out, header, rows)
    if cfg.logger.name == "wandb":
        import wandb

        from shadow.tracking import wandb_mode

        settings = OmegaConf.to_container(cfg, resolve=True)
        with wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, job_type="latency",
                        mode=wandb_mode(), dir=str(out), config={**settings, "setting": header}) as wandb_run:
            wandb_run.log({"latency": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])})
    print(f"\nwritten to {out}/latency.{{csv,md,json}}")
    return rows


@hydra.main(version_base="1.3", config_path="../../conf", config_name="latency")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        fail(err)


if __name__ == "__main__":
    sys.argv[1:] = fix_argv(sys.argv[1:])
    main()
