"""Entry point: ``python -m shadow +criterion=plainact -m sparsity=0.3,0.5``.

argv is reordered and every job it describes is checked first (``shadow.cli``), a sweep file's too:
``python -m shadow --config-dir sweeps --config-name paper_criteria``. ``--cfg`` prints the config resolved, so
the model's local path shows. Errors are one line; HYDRA_FULL_ERROR=1 shows the traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from shadow.cli import check_argv, fail, fix_argv
from shadow.compose import CONF_DIR, check_devices, register_configs
from shadow.errors import ConfigError

log = logging.getLogger("shadow")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict[str, float]:
    from shadow.run import run  # late import: --help and --cfg stay fast

    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else output_dir
    try:
        return run(cfg, output_dir, sweep_dir, job_name=hc.job.override_dirname or hc.job.name)
    except ConfigError as err:
        fail(err)


if __name__ == "__main__":
    register_configs()
    sys.argv[1:] = fix_argv(sys.argv[1:])
    if {"--cfg", "-c"} & set(sys.argv):
        print("note: --cfg prints the config unchecked; drop --cfg to check every job", file=sys.stderr)
    elif not {"--help", "-h", "--hydra-help"} & set(sys.argv):
        try:
            check_argv(sys.argv[1:], devices=check_devices)
        except ConfigError as err:
            fail(err)
    main()
