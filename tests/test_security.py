"""Security: nothing unpickled or evaluated, no remote code unless asked for, no shell, writes stay inside the
job's output and cache directories."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import shadow
from shadow.compose import compose_config
from shadow.models import check_model, read_config

PACKAGE = Path(shadow.__file__).resolve().parent
FORBIDDEN = {
    "pickle": re.compile(r"\bc?pickle\b"),
    "eval(": re.compile(r"(?<![\w.])eval\("),
    "exec(": re.compile(r"(?<![\w.])exec\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "shell=True": re.compile(r"shell\s*=\s*True"),
    "os.system": re.compile(r"os\.system\("),
}


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("name", FORBIDDEN)
def test_the_package_never_uses(name):
    hits = [f"{path.relative_to(PACKAGE)}:{n}" for path in sources()
            for n, line in enumerate(path.read_text().splitlines(), 1) if FORBIDDEN[name].search(line)]
    assert hits == []


def test_torch_load_only_reads_weights():
    calls = [line for path in sources() for line in path.read_text().splitlines() if "torch.load(" in line]
    assert all("weights_only=True" in line for line in calls)


def test_remote_code_is_off_unless_the_config_says_so(monkeypatch, caplog):
    import transformers

    seen = []
    real = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **{k: v for k, v in kwargs.items() if k != "trust_remote_code"})
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    read_config.cache_clear()  # configs are read once per process
    check_model(compose_config().model)
    assert seen == [False] and "trust_remote_code" not in caplog.text
    check_model(compose_config("model.trust_remote_code=true").model)
    assert seen == [False, True] and "model.trust_remote_code=true: Python code shipped with" in caplog.text


def test_subprocesses_take_argument_lists_never_a_shell_line():
    calls = [m for path in sources() for m in re.finditer(r"subprocess\.\w+\(([^,)]*)", path.read_text())]
    assert calls  # the opt-mini builder and the memory benchmark start processes
    assert all(m[1].startswith("[") or m[1] == "cmd" for m in calls), [m[0] for m in calls]
    assert 'cmd = source["fetch"] + ' in (PACKAGE / "opt_mini" / "build.py").read_text()  # a list constant
