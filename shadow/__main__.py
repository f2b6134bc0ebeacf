"""Entry point: ``python -m shadow +criterion=plainact -m sparsity=0.3,0.5``.

Hydra 1.3 rejects overrides on both sides of ``-m`` (hydra issue #3053), so value-less flags move to the front
of argv first. ``--cfg`` prints the config resolved, so the model's local path shows.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from shadow.config import ConfigError, register_configs

FRONT_FLAGS = ("-m", "--multirun")
log = logging.getLogger("shadow")


def fix_argv(argv: list[str]) -> list[str]:
    """Flags first, then everything else in order; ``--cfg``/``-c`` also get ``--resolve``."""
    flags = [a for a in argv if a in FRONT_FLAGS]
    rest = [a for a in argv if a not in FRONT_FLAGS]
    if any(a in ("--cfg", "-c") for a in rest) and "--resolve" not in rest:
        rest.append("--resolve")
    return flags + rest


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, float]:
    from shadow.run import run  # late import: --help and --cfg stay fast

    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else output_dir
    try:
        return run(cfg, output_dir, sweep_dir, job_name=hc.job.override_dirname or hc.job.name)
    except ConfigError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    register_configs()
    sys.argv[1:] = fix_argv(sys.argv[1:])
    main()
