"""Faults: a job killed with SIGKILL in every stage, then rerun; corrupt and truncated artifacts.

The figure (docs/reliability.md): 4 stages killed, 0 results lost — the job started again after each kill and
killed in the next stage reuses each artifact finished before, reads no partial one, and its last, uninterrupted
run reports metrics identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import ROOT

SETTINGS = ("+criterion=plainact logger=none calibration.limit=48 predictor.head_epochs=6 predictor.neuron_epochs=2 "
            "predictor.head_hidden=64 predictor.neuron_hidden=64 eval.limit=6 eval.protocols=[token]")
# the first line each stage prints; the job is killed the moment it appears
STAGES = {"scoring": "scoring (plainact)", "predictor training": "predictor (heads)",
          "evaluation": "token perplexity", "writing results": "evaluate   done"}


def command(run_dir) -> list[str]:
    return [sys.executable, "-m", "shadow", *SETTINGS.split(), f"hydra.run.dir={run_dir}"]


def environment(cache) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "SHADOW_CACHE_DIR": str(cache)}


def complete(run_dir, cache) -> tuple[dict, str]:
    result = subprocess.run(command(run_dir), cwd=ROOT, capture_output=True, text=True, env=environment(cache),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())["metrics"], result.stdout + result.stderr


def kill_at(line: str, run_dir, cache) -> str:
    """Start the job and SIGKILL it when ``line`` appears in its output; what it printed until then."""
    job = subprocess.Popen(command(run_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=environment(cache))
    seen = b""
    while line.encode() not in seen:
        chunk = os.read(job.stdout.fileno(), 4096)
        assert chunk, f"the job ended before printing {line!r}:\n{seen.decode()[-3000:]}"
        seen += chunk
    job.send_signal(signal.SIGKILL)
    job.wait()
    job.stdout.close()
    return seen.decode()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An uninterrupted run's metrics, and its cache."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    metrics, _ = complete(tmp / "run", tmp / "cache")
    return metrics, tmp / "cache"


def finished(cache) -> set[str]:
    return {kind for kind in ("traces", "predictor")
            if any(p.is_dir() and not p.name.startswith(".") for p in (cache / kind).glob("*"))}


@pytest.mark.slow
def test_a_job_killed_in_every_stage_in_turn_reruns_to_the_same_metrics(uninterrupted, tmp_path):
    """One cache, the job started again after each kill and killed in the next stage: every start reuses what the
    ones before it finished and takes nothing partial for an artifact, and the last run, uninterrupted, reports the
    uninterrupted run's metrics."""
    cache, done = tmp_path / "cache", set()
    for stage, line in STAGES.items():
        log = kill_at(line, tmp_path / stage.replace(" ", "_"), cache)
        assert "recomputing" not in log, stage
        for kind in done:  # finished before this start: read again, not recomputed
            assert f"{kind}: reusing" in log, (stage, kind)
        done = finished(cache)
        assert done == {"scoring": set(), "predictor training": {"traces"}}.get(stage, {"traces", "predictor"})
    metrics, log = complete(tmp_path / "rerun", cache)
    assert not list(cache.glob("*/.*-*"))  # what the killed jobs were building is gone
    if "skipped" not in log:  # killed after its results were stored: the rerun just reports them
        assert "traces: reusing" in log and "predictor: reusing" in log
    assert "recomputing" not in log
    assert metrics == uninterrupted[0]


def test_corrupt_and_truncated_artifacts_are_detected_and_recomputed(uninterrupted, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(uninterrupted[1], cache)
    [shard] = (cache / "traces").glob("*/*.safetensors")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    [weights] = (cache / "predictor").glob("*/predictor.safetensors")
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    [record] = (cache / "results").glob("*/record.json")
    record.write_text(record.read_text()[:50])
    metrics, log = complete(tmp_path / "second", cache)
    assert log.count("fails its checksum); recomputing it") == 3  # results, traces, predictor
    assert metrics == uninterrupted[0]
