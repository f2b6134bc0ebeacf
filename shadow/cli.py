"""Command-line handling before Hydra runs: argv order, and every job of a sweep checked before any job starts.

Hydra 1.3 rejects overrides on both sides of ``-m`` (hydra issue #3053), so value-less flags move to the front
of argv first. Then each override is checked: a config group's option must exist, and every combination of a
sweep must compose against the typed schema and pass ``validate``, so a typo in the last value of a sweep fails
at once, in one line, not after the other jobs have run.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from shadow.config import EVAL_SCHEMAS, ConfigError, conf_options, register_configs, validate

FRONT_FLAGS = ("-m", "--multirun")
VALUE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c", "--package",
               "-p", "--experimental-rerun")
CONF = Path(__file__).resolve().parent.parent / "conf"
LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm")  # provided by Hydra and its plugins
TYPES = {"Float": "a number", "Integer": "a whole number", "Boolean": "true or false"}
MAX_CHECKED = 256  # sweeps larger than this are checked on their first combinations only


def fix_argv(argv: list[str]) -> list[str]:
    """Flags first, then everything else in order; ``--cfg``/``-c`` also get ``--resolve``."""
    flags = [a for a in argv if a in FRONT_FLAGS]
    rest = [a for a in argv if a not in FRONT_FLAGS]
    if any(a in ("--cfg", "-c") for a in rest) and "--resolve" not in rest:
        rest.append("--resolve")
    return flags + rest


def fail(err: ConfigError) -> None:
    """Exit with the error's one line (the traceback with HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    raise SystemExit(f"error: {err}") from None


def overrides_of(argv: list[str]) -> tuple[list[str], bool]:
    """The overrides in argv, and whether a primary config other than ours was named."""
    overrides, other_config, skip = [], False, False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            name = arg.split("=", 1)[0]
            other_config |= name in ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")
            skip = name in VALUE_FLAGS and "=" not in arg
        else:
            overrides.append(arg)
    return overrides, other_config


def options(group: str) -> list[str]:
    return sorted({*conf_options(group), *LAUNCHERS}) if group == "hydra/launcher" else conf_options(group)


def check_argv(argv: list[str]) -> None:
    """Raise ConfigError (one line: key, value, fix) for the first bad override of any job argv describes."""
    overrides, other_config = overrides_of(argv)
    parser, parsed = OverridesParser.create(), []
    for override in overrides:
        try:
            parsed += parser.parse_overrides([override])
        except HydraException as err:
            raise ConfigError(f"{override} does not parse ({str(err).splitlines()[0]}); write key=value, key=a,b "
                              "for a sweep, key=[a,b] for a list") from None
    groups = {"criterion", "predictor", "model", "calibration", "eval", "compat", "logger", "hydra/launcher"}
    choices = []
    for override in parsed:
        if override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else \
            [override.get_value_element_as_str()]
        key = override.key_or_group
        for value in values if key in groups else []:
            if value not in options(key):
                raise ConfigError(f"{key}={value} is not an option; use one of: {', '.join(options(key))}")
        if not key.startswith("hydra"):
            prefix = override.input_line.split(key, 1)[0]  # + or ++ or nothing
            choices.append([f"{prefix}{key}={v}" for v in values])
    if other_config or {"--cfg", "-c", "--info", "-i"} & set(argv):
        return  # sweep files compose against their own directory (their jobs are checked as they start)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for combination in itertools.islice(itertools.product(*choices), MAX_CHECKED):
            check_job(list(combination))


def check_job(overrides: list[str]) -> None:
    """Compose one job (inside an initialised Hydra) and validate it."""
    try:
        cfg = compose(config_name="config", overrides=overrides)
    except HydraException as err:
        cause = err.__cause__
        if not isinstance(cause, OmegaConfBaseException):
            raise ConfigError(" ".join(line.strip() for line in str(err).splitlines()[:2])) from None
        key, value = cause.full_key, getattr(cause, "value", None)
        if value is None:
            section, _, leaf = key.partition(".")
            kinds = [kind for kind, schema in EVAL_SCHEMAS.items() if leaf in schema.__dataclass_fields__]
            if section == "eval" and kinds:
                kind = kinds[0]
                raise ConfigError(f"{key} applies only to eval={kind}; add eval={kind}, or drop {key}") from None
            raise ConfigError(f"{key} is not a setting; check its spelling (python -m shadow --cfg job lists "
                              "them all)") from None
        wanted = re.search(r"converted to (\w+)", cause.msg)
        kind = TYPES.get(wanted[1], f"a {wanted[1]}") if wanted else "of the right type"
        raise ConfigError(f"{key}={value!r} is not {kind}; give {key} {kind}") from None
    validate(cfg)
