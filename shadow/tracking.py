"""Results on disk (metrics.json per job, results.jsonl per sweep) and in Weights & Biases (one run per job)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from shadow.criteria import get_criterion
from shadow.placements import PLACEMENTS
from shadow.policy import Policy

log = logging.getLogger(__name__)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The keys runs are compared by, flat, then the whole resolved config under ``config``; head and neuron
    sparsity as the job's policy asks them (a head-only criterion's neurons, GRIFFIN's heads: 0)."""
    placement = PLACEMENTS[cfg.predictor.name]
    policy = Policy.configured(cfg, get_criterion(cfg.criterion.name, cfg.criterion.variant).heads_only,
                               placement.dense_attention)
    return {
        "model": cfg.model.name, "criterion": cfg.criterion.name, "criterion_variant": cfg.criterion.variant,
        "predictor": cfg.predictor.name,
        "method": placement.method(cfg.criterion.name, cfg.predictor.granularity),
        "sparsity": cfg.sparsity, "head_sparsity": policy.head_sparsity, "neuron_sparsity": policy.neuron_sparsity,
        "policy": cfg.policy, "layer_scale": cfg.layer_scale, "dense_first_layer": cfg.dense_first_layer,
        "compat": cfg.compat, "attention_unit": cfg.attention_unit, "granularity": cfg.predictor.granularity,
        "allocation": cfg.predictor.allocation,
        "calibration": cfg.calibration.source, "dtype": cfg.model.dtype,
        "eval": cfg.eval.get("dataset", cfg.eval.name), "mask_from": cfg.eval.mask_from,
        "context": cfg.eval.context, "seed": cfg.seed,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write_results(output_dir: Path, sweep_dir: Path, record: dict[str, Any]) -> None:
    """metrics.json in the job's directory (atomically) and one appended line in the sweep's results.jsonl."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(output_dir / "metrics.json")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(sweep_dir / "results.jsonl.lock")), (sweep_dir / "results.jsonl").open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def wandb_mode() -> str | None:
    """WANDB_MODE wins; without it, online with credentials and offline without (never fail for lack of a key)."""
    if os.environ.get("WANDB_MODE"):
        return None
    import wandb

    return "online" if wandb.login(prompt=False, verify=False) else "offline"


class Tracker:
    """One W&B run per job, finished even when the job fails; ``logger=none`` turns it off."""

    def __init__(self, cfg: DictConfig, output_dir: Path, group: str, name: str):
        self.cfg, self.output_dir, self.group, self.name = cfg, output_dir, group, name
        self.run = None

    def __enter__(self) -> Tracker:
        if self.cfg.logger.name == "wandb":
            import wandb

            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=self.cfg.logger.project, entity=self.cfg.logger.entity,
                                  group=self.group, name=self.name, tags=list(self.cfg.logger.tags),
                                  config=flat_config(self.cfg), dir=str(self.output_dir), mode=wandb_mode(),
                                  reinit="finish_previous")
        return self

    def summary(self, metrics: dict[str, Any], tables: dict[str, dict[str, list[float]]]) -> None:
        """Metrics into the run's summary; per-layer columns (name → column → values) as tables by layer."""
        if self.run is None:
            return
        import wandb

        self.run.summary.update(metrics)
        logged = {}
        for name, columns in tables.items():
            if columns:
                rows = [[layer, *values] for layer, values in enumerate(zip(*columns.values(), strict=True))]
                logged[name] = wandb.Table(columns=["layer", *columns], data=rows)
        self.run.log({**logged, **metrics})

    def lm_eval(self, out: dict[str, Any]) -> None:
        """lm-eval's own W&B logger, attached to this job's run: its results tables and per-task metrics."""
        if self.run is not None:
            from lm_eval.loggers import WandbLogger

            logger = WandbLogger()
            logger.post_init(out)
            logger.log_eval_result()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if exc_type else 0)
