"""Command-line handling before Hydra runs: argv order, and every job of a sweep checked before any job starts.

Hydra 1.3 rejects overrides on both sides of a flag (hydra issue #3053: ``-m``, ``--config-name x``), so flags,
with their values, move to the front of argv first. Then each override is checked: a config group's option must
exist, and every job must compose against the typed schema and pass ``check_launch`` (``validate``, and what the
model's config and lm-eval's tasks decide), so a typo in the last value of a sweep, or a layer the model lacks,
fails at once, in one line, before any job starts. The jobs are those Hydra's basic sweeper
would launch: the sweep file's ``hydra.sweeper.params`` grid (``--config-dir sweeps --config-name
paper_criteria``, in multirun mode) combined with the command line's overrides, which replace the grid's values
of the same key. ``check_argv`` takes the primary config's name and the check to run, so other Hydra apps over
conf/ (the latency benchmark: ``check_argv(argv, "latency", check)``) check their sweeps the same way. Checks of
this machine's devices (``devices``) run only for jobs launched here: a SLURM job checks its own node.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shadow.compose import CONF_DIR, check_launch, conf_options, register_configs
from shadow.config import EVAL_SCHEMAS, CriterionConfig
from shadow.errors import ConfigError, did_you_mean

LONG = {"-cd": "--config-dir", "-cn": "--config-name", "-cp": "--config-path", "-c": "--cfg", "-p": "--package",
        "-i": "--info", "-m": "--multirun", "-sc": "--shell-completion"}
VALUE_FLAGS = ("--config-dir", "--config-name", "--config-path", "--cfg", "--package", "--experimental-rerun")
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")  # --info's optional value
# these show or rerun a config and launch none of argv's jobs (--cfg job must work without +criterion: it lists
# the settings); --config-path replaces conf/ by a directory relative to the app's file, which only Hydra knows
UNCHECKED = ("--cfg", "--info", "--shell-completion", "--experimental-rerun", "--config-path")
GROUPS = ("criterion", "predictor", "model", "calibration", "eval", "compat", "logger", "hydra/launcher")
LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm")  # provided by Hydra and its plugins
TYPES = {"Float": "a number", "Integer": "a whole number", "Boolean": "true or false"}
MAX_CHECKED = 256  # sweeps larger than this are checked on their first combinations only


def fix_argv(argv: list[str]) -> list[str]:
    """Flags first, each with its value (``--config-dir sweeps``), then the overrides in order; ``--cfg``/``-c`` also
    get ``--resolve``."""
    flags, rest, pending = [], [], None
    for arg in argv:
        if pending is not None and (pending != "--info" or arg in INFO_CHOICES):
            flags.append(arg)
            pending = None
            continue
        pending = None
        if not arg.startswith("-"):
            rest.append(arg)
            continue
        flags.append(arg)
        name = LONG.get(arg, arg)
        pending = name if name in (*VALUE_FLAGS, "--info") else None
    if any(a in ("--cfg", "-c") for a in flags) and "--resolve" not in flags:
        flags.append("--resolve")
    return flags + rest


def fail(err: ConfigError) -> None:
    """Exit with the error's one line (the traceback with HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    raise SystemExit(f"error: {err}") from None


def overrides_of(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The overrides in argv, and its flags by long name with their values ('' for a flag without one)."""
    overrides: list[str] = []
    flags: dict[str, str] = {}
    pending = None  # a flag whose value is the next argument
    for arg in argv:
        if pending and (pending != "--info" or arg in INFO_CHOICES):
            flags[pending], pending = arg, None
            continue
        pending = None
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            name = LONG.get(name, name)
            flags[name] = value
            pending = name if name in (*VALUE_FLAGS, "--info") and not eq else None
        else:
            overrides.append(arg)
    return overrides, flags


def parsed(overrides: list[str]) -> list[Override]:
    parser, result = OverridesParser.create(), []
    for override in overrides:
        try:
            result += parser.parse_overrides([override])
        except HydraException as err:
            raise ConfigError(f"{override} does not parse ({str(err).splitlines()[0]}); write key=value, key=a,b "
                              "for a sweep, key=[a,b] for a list") from None
    return result


def values(override: Override) -> list[str]:
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else \
        [override.get_value_element_as_str()]


def options(group: str, dirs: list[Path]) -> list[str]:
    found = {*conf_options(group), *(p.stem for d in dirs for p in d.glob(f"{group}/*.yaml"))}
    return sorted({*found, *LAUNCHERS}) if group == "hydra/launcher" else sorted(found)


def looks_like_path(value: str) -> bool:
    return "/" in value or value.startswith((".", "~")) or value.endswith(".gguf") or Path(value).exists()


def check_groups(overrides: list[Override], dirs: list[Path]) -> None:
    """A config group's value must be one of its options: one line listing them beats Hydra's error."""
    for override in overrides:
        key = override.key_or_group
        for value in values(override) if key in GROUPS and not override.is_delete() else []:
            known = options(key, dirs)
            if value in known:
                continue
            if key == "model" and looks_like_path(value):
                raise ConfigError(f"model={value} is not a preset; for a checkpoint of your own write "
                                  f"model.path={value} (docs/your-model.md)")
            raise ConfigError(f"{key}={value} is not an option{did_you_mean(value, known)}; use one of: "
                              f"{', '.join(known)}")


def merged(overrides: list[Override]) -> list[Override]:
    """The last override of each key, in the place of its first (as Hydra's basic sweeper combines the grid and
    then the command line); the key keeps its + or ++, so +criterion=x replaces the grid's +criterion."""
    last = {override.get_key_element(): override for override in overrides}
    return list(last.values())


def sweep_lists(overrides: list[Override]) -> list[list[str]]:
    """Each key's job overrides: the values of a sweep, or the one value."""
    return [[f"{o.get_key_element()}={value}" for value in values(o)] for o in overrides
            if not o.is_delete() and not o.key_or_group.startswith("hydra")]


def primary_dir(name: str, dirs: list[Path]) -> Path:
    """The directory Hydra takes the primary config from: conf/ first, then --config-dir."""
    for directory in dirs:
        if (directory / f"{name}.yaml").is_file():
            return directory
    names = sorted({p.stem for d in dirs for p in d.glob("*.yaml")})
    raise ConfigError(f"--config-name={name} is not a config in {' or '.join(map(str, dirs))}; use one of: "
                      f"{', '.join(names)}")


def search_path(dirs: list[Path], source: Path, name: str, hydra_overrides: list[Override]) -> list[str]:
    """The override that keeps conf/ and --config-dir both reachable: Hydra's run searches the app's conf/ and
    --config-dir, the compose API only the directory it is given. The file's or the command line's own
    hydra.searchpath, which this override replaces, follows them."""
    others = [d for d in dirs if d != source]
    if not others:
        return []
    given = next((o.value() for o in hydra_overrides if o.get_key_element() == "hydra.searchpath"), None)
    if given is None:
        given = OmegaConf.select(OmegaConf.load(source / f"{name}.yaml"), "hydra.searchpath", default=[])
    paths = [f"file://{d}" for d in others] + [str(p) for p in given]
    return [f"hydra.searchpath=[{','.join(repr(p) for p in paths)}]"]


def check_argv(argv: list[str], config_name: str = "config", check: Callable[[DictConfig], None] = check_launch,
               devices: Callable[[DictConfig], None] | None = None) -> None:
    """Raise ConfigError (one line: key, value, fix) for the first bad override of any job argv describes: the
    command line's sweep, or a sweep file's grid with the command line's overrides. Jobs are composed from
    ``config_name`` (or --config-name) and passed to ``check``, and to ``devices`` when they run on this machine
    (not through a SLURM launcher: a job checks its node's devices itself); nothing is loaded."""
    overrides, flags = overrides_of(argv)
    dirs = [CONF_DIR, *([Path(flags["--config-dir"]).absolute()] if flags.get("--config-dir") else [])]
    cli = parsed(overrides)
    check_groups(cli, dirs)
    if set(UNCHECKED) & flags.keys():
        return
    name = (flags.get("--config-name") or config_name).removesuffix(".yaml")
    source = primary_dir(name, dirs)
    hydra_cli = [o for o in cli if o.key_or_group.startswith("hydra") and not o.is_sweep_override()]
    fixed = [*search_path(dirs, source, name, hydra_cli), *(o.input_line for o in hydra_cli)]
    register_configs()
    with initialize_config_dir(config_dir=str(source), version_base="1.3"):
        base = composed(name, fixed, with_hydra=True)
        multirun = "--multirun" in flags or base.hydra.mode == RunMode.MULTIRUN  # else Hydra ignores the grid
        here = "slurm" not in str(OmegaConf.select(base, "hydra.launcher._target_", default="")).lower()
        params = base.hydra.sweeper.get("params") if multirun else None
        grid = parsed([f"{key}={value}" for key, value in (params or {}).items()])
        jobs = merged(grid + cli)
        check_groups(jobs, dirs)
        for job in itertools.islice(itertools.product(*sweep_lists(jobs)), MAX_CHECKED):
            job_cfg = composed(name, [*fixed, *job])
            if here and devices is not None:  # first: cheap, and a job for a GPU needs no model check here
                devices(job_cfg)
            check(job_cfg)


def setting_names(name: str) -> list[str]:
    """Every setting of the primary config ``name`` (inside an initialised Hydra), dotted, with every kind's
    evaluation settings and the criterion's: what a misspelt key is matched against."""
    found = [f"eval.{key}" for schema in EVAL_SCHEMAS.values() for key in schema.__dataclass_fields__]
    found += [f"criterion.{key}" for key in CriterionConfig.__dataclass_fields__]

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            child = node._get_node(key)
            found.append(prefix + str(key))
            if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
                walk(child, f"{prefix}{key}.")

    walk(compose(config_name=name), "")
    return sorted(set(found))


def composed(name: str, overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """Compose one config (inside an initialised Hydra); its errors as one-line ConfigErrors."""
    try:
        return compose(config_name=name, overrides=overrides, return_hydra_config=with_hydra)
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
            raise ConfigError(f"{key} is not a setting{did_you_mean(key, setting_names(name))}; check its spelling "
                              "(python -m shadow --cfg job lists them all)") from None
        wanted = re.search(r"converted to (\w+)", cause.msg)
        kind = TYPES.get(wanted[1], f"a {wanted[1]}") if wanted else "of the right type"
        raise ConfigError(f"{key}={value!r} is not {kind}; give {key} {kind}") from None
