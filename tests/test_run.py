"""The whole job in-process on a tiny OPT: stages, caching, determinism, results on disk and in W&B."""

from __future__ import annotations

import json

import pytest
from helpers import make_tiny_opt

from shadow.evaluate.perplexity import evaluate_perplexity, load_eval_data
from shadow.models import load_model
from shadow.run import run

FAST = ["calibration.limit=24", "calibration.batch_size=8", "predictor.head_epochs=3", "predictor.neuron_epochs=2",
        "predictor.head_hidden=32", "predictor.neuron_hidden=32", "eval.limit=2", "eval.batch_size=16"]
FAST_PERPLEXITY = ["eval.seq_len=32"]


def save_tiny_opt(directory, tokenizer):
    path = directory / "tiny-opt"
    make_tiny_opt().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def composer(compose_cfg, model_dir, cache):
    def _job(*overrides: str):
        fast = FAST if "eval=tasks" in overrides else FAST + FAST_PERPLEXITY
        return compose_cfg("+criterion=plainact", f"model.path={model_dir}", f"cache_dir={cache}", *fast, *overrides)
    return _job


@pytest.fixture
def job(compose_cfg, tmp_path, tokenizer):
    """A job's config on a tiny OPT, with a model and a cache of the test's own."""
    return composer(compose_cfg, save_tiny_opt(tmp_path, tokenizer), tmp_path / "cache")


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("shared")
    return save_tiny_opt(root, tokenizer), root / "cache"


@pytest.fixture
def shared_job(compose_cfg, shared):
    """As ``job``, on one model and cache for the module's tests that use it: the cache keys keep apart what
    differs between their jobs (placement, protocol), so that what they have in common (the traces) runs once."""
    return composer(compose_cfg, *shared)


def test_job_writes_results_and_reuses_artifacts(job, tmp_path, caplog):
    caplog.set_level("INFO")
    sweep = tmp_path / "sweep"
    first = run(job("sparsity=0.5", "logger=none"), tmp_path / "a", sweep)
    assert "traces: reusing" not in caplog.text
    run(job("sparsity=0.3", "logger=none"), tmp_path / "b", sweep)
    assert "traces: reusing" in caplog.text and "predictor: reusing" in caplog.text
    for key in ("token_perplexity", "word_perplexity", "bits_per_byte", "predictor/heads_val_spearman",
                "predictor/neurons_val_spearman"):
        assert key in first
    assert first["achieved_head_sparsity"] == pytest.approx(0.5)
    assert first["achieved_neuron_sparsity"] == pytest.approx(0.5)
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["metrics"] == first
    for kind in ("head_sparsity", "neuron_sparsity"):  # global policy: layers differ, their mean is the target
        assert len(saved["sparsity_per_layer"][kind]) == 3
        assert sum(saved["sparsity_per_layer"][kind]) / 3 == pytest.approx(0.5)
    lines = [json.loads(x) for x in (sweep / "results.jsonl").read_text().splitlines()]
    assert [x["sparsity"] for x in lines] == [0.5, 0.3] and lines[0]["criterion"] == "plainact"


def test_a_rerun_skips_finished_jobs_unless_forced(job, tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO")
    first = run(job("logger=none"), tmp_path / "a", tmp_path / "sweep1")

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished job loaded its model again")
    monkeypatch.setattr("shadow.run.load_model", no_loading)
    assert run(job("logger=none"), tmp_path / "b", tmp_path / "sweep2") == first
    assert "skipped; force=true reruns it" in caplog.text
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"] == first
    assert json.loads((tmp_path / "sweep2" / "results.jsonl").read_text())["output_dir"] == str(tmp_path / "b")
    with pytest.raises(AssertionError, match="loaded its model again"):
        run(job("logger=none", "force=true"), tmp_path / "c", tmp_path / "sweep3")
    monkeypatch.undo()
    caplog.clear()
    assert run(job("logger=none", "seed=1"), tmp_path / "d") != first  # another setting is another job
    assert "traces: reusing" in caplog.text and "predictor: reusing" not in caplog.text  # a seed trains anew


def test_sparsity_zero_is_the_dense_model(job, tmp_path):
    cfg = job("sparsity=0.0", "logger=none")
    metrics = run(cfg, tmp_path / "zero")
    model, tokenizer = load_model(cfg.model, cfg.device)
    dense, _ = evaluate_perplexity(model, tokenizer, lambda prompts: None, cfg.eval, load_eval_data(cfg.eval))
    assert metrics["token_perplexity"] == dense["token_perplexity"]
    assert metrics["word_perplexity"] == dense["word_perplexity"]


def test_sparsity_raises_perplexity(job, tmp_path):
    low = run(job("sparsity=0.1", "logger=none"), tmp_path / "low")
    high = run(job("sparsity=0.8", "logger=none"), tmp_path / "high")
    assert high["token_perplexity"] > low["token_perplexity"]


def test_wandb_run_is_logged_offline(job, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(job("sparsity=0.3"), tmp_path / "tracked")
    runs = list((tmp_path / "tracked" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1


def test_dense_predictor_is_the_dense_model(job, tmp_path):
    metrics = run(job("predictor=dense", "logger=none"), tmp_path / "dense")
    zero = run(job("sparsity=0.0", "logger=none"), tmp_path / "zero")
    assert metrics["token_perplexity"] == zero["token_perplexity"]
    assert metrics["achieved_head_sparsity"] == 0.0 and "predictor/heads_val_spearman" not in metrics


PLACEMENTS = [["predictor=dense"], ["predictor=static"], ["predictor=oracle"], ["predictor=shadow"],
              ["predictor=dejavu"], ["predictor=shadow", "predictor.granularity=token"],
              ["predictor=dejavu", "predictor.granularity=token"]]
PROTOCOLS = [["eval.protocols=[token,word]", "eval.seq_len=null"],  # windows of the model's whole context
             ["eval=tasks", "eval.limit=4"]]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["perplexity", "tasks"])
@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: ",".join(x.split("=")[1] for x in p))
def test_every_placement_runs_under_every_protocol(shared_job, tmp_path, placement, protocol):
    """Word-perplexity windows hold the model's whole context plus one target: every mask source must read
    only what the model reads."""
    cfg = shared_job(*placement, *protocol, "sparsity=0.5", "logger=none")
    metrics = run(cfg, tmp_path / "job")
    sparse = placement != ["predictor=dense"]
    assert metrics["achieved_head_sparsity"] == pytest.approx(0.5 if sparse else 0.0)
    assert metrics["achieved_neuron_sparsity"] == pytest.approx(0.5 if sparse else 0.0)
    layers = metrics["weights_read"] - metrics["predictor_read"]  # the model's own weights
    assert (0.5 < layers < 1) if sparse else metrics["weights_read"] == 1
    assert (metrics["predictor_read"] > 0) == (placement[0] in ("predictor=shadow", "predictor=dejavu"))
    assert metrics["weights_read_effective"] < metrics["weights_read"]  # OPT's ReLU zeros
    every_layer_first = placement == ["predictor=dejavu", "predictor.granularity=token"]  # each head, then predicts
    assert (metrics["kv_read"] < 1) == (sparse and not every_layer_first)
    setup = json.loads((tmp_path / "job" / "metrics.json").read_text())["setup_seconds"]
    assert setup > 0 if placement[0] in ("predictor=static", "predictor=shadow", "predictor=dejavu") else setup == 0
    if cfg.eval.name == "tasks":
        assert 0 <= metrics["tasks/mean_acc"] <= 1
    else:
        assert metrics["token_perplexity"] > 1 and metrics["word_perplexity"] > 1


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["perplexity", "tasks"])
def test_griffin_runs_under_every_protocol_with_attention_dense_unless_asked(job, tmp_path, protocol):
    """GRIFFIN: each request's FFN units from its own prompt, none calibrated or trained; attention dense unless
    head_sparsity asks, then its units by the same statistic; each request's context run whole (eval.context=auto
    resolves to dense, and is recorded so)."""
    metrics = run(job("predictor=griffin", "policy=local", *protocol, "sparsity=0.5", "logger=none"), tmp_path / "a")
    assert metrics["achieved_head_sparsity"] == 0 and metrics["achieved_neuron_sparsity"] == pytest.approx(0.5)
    assert metrics["predictor_read"] == 0 and metrics["kv_read"] == 1 and 0.5 < metrics["weights_read"] < 1
    record = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert record["setup_seconds"] == 0 and record["context"] == "dense"
    assert (record["head_sparsity"], record["neuron_sparsity"]) == (0, 0.5)  # as the policy asks them
    heads = run(job("predictor=griffin", "policy=local", *protocol, "sparsity=0.5", "head_sparsity=0.5",
                    "logger=none"), tmp_path / "b")
    assert heads["achieved_head_sparsity"] == pytest.approx(0.5) and heads["kv_read"] < 1
    assert heads["weights_read"] < metrics["weights_read"]
    if protocol[0] != "eval=tasks":
        assert metrics["token_perplexity"] < heads["token_perplexity"]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["perplexity", "tasks"])
@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_thresholded_placements_run_under_every_protocol(job, tmp_path, method, protocol):
    """Thresholds from the calibration set, applied to other text, later layers seeing sparser inputs: the
    achieved sparsity lands near the asked one where the input has no exact zeros. At OPT's down projection, about
    half of whose input ReLU zeroes, the threshold for half falls among those zeros: they are not counted as
    dropped, nor credited to the structural weights read, only to the effective one. CATS leaves attention
    dense."""
    metrics = run(job(f"predictor={method}", *protocol, "sparsity=0.5", "logger=none"), tmp_path / "job")
    per_input = method in ("teal", "wina")
    sites = ["query", "key", "value", "output", "up", "down"] if per_input else ["activation"]
    assert all(f"achieved_{site}_sparsity" in metrics for site in sites)
    below_relu = metrics["achieved_down_sparsity" if per_input else "achieved_activation_sparsity"]
    assert below_relu < 0.2
    if per_input:
        assert all(metrics[f"achieved_{site}_sparsity"] == pytest.approx(0.5, abs=0.15) for site in sites[:-1])
        assert metrics["weights_read"] < 1  # the LM head of a 16-wide model with 8192 tokens is most of it
    else:
        assert metrics["achieved_head_sparsity"] == 0 and metrics["weights_read"] <= 1
    assert metrics["weights_read_effective"] < metrics["weights_read"] and metrics["kv_read"] == 1
    assert "predictor/heads_val_spearman" not in metrics
    again = run(job(f"predictor={method}", *protocol, "sparsity=0.5", "logger=none", "force=true"), tmp_path / "b")
    assert again == metrics
    assert len([p for p in (tmp_path / "cache" / "histograms").iterdir() if p.is_dir()]) == 1  # computed once
    setup = [json.loads((tmp_path / d / "metrics.json").read_text())["setup_seconds"] for d in ("job", "b")]
    assert setup[0] > 0 and setup[1] == setup[0]  # the calibration's time, as recorded when it ran


def test_teal_with_the_greedy_allocation(job, tmp_path):
    """Each layer's sites get their own shares, whose parameter-weighted mean is the asked sparsity: the achieved
    sparsities differ between sites but the weights read stay near the uniform allocation's. The allocation is a
    cached artifact beside the histograms, its time part of the job's setup."""
    uniform = run(job("predictor=teal", "sparsity=0.5", "logger=none"), tmp_path / "uniform")
    greedy = run(job("predictor=teal", "predictor.allocation=greedy", "sparsity=0.5", "logger=none"),
                 tmp_path / "greedy")
    sites = [greedy[f"achieved_{site}_sparsity"] for site in ("query", "key", "value", "output", "up", "down")]
    assert max(sites) - min(sites) > 0.1
    assert greedy["weights_read"] == pytest.approx(uniform["weights_read"], abs=0.05)
    assert greedy["token_perplexity"] != uniform["token_perplexity"]
    assert len([p for p in (tmp_path / "cache" / "histograms").iterdir() if p.is_dir()]) == 1
    assert len([p for p in (tmp_path / "cache" / "allocation").iterdir() if p.is_dir()]) == 1
    setup = [json.loads((tmp_path / d / "metrics.json").read_text())["setup_seconds"] for d in ("uniform", "greedy")]
    assert setup[1] > setup[0] > 0


def test_task_evaluation_job(job, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = run(job("eval=tasks", "eval.limit=8", "sparsity=0.3"), tmp_path / "tasks")
    assert 0 <= metrics["tasks/mean_acc"] <= 1 and "opt_mini_nextsent/acc" in metrics
    assert metrics["achieved_head_sparsity"] == pytest.approx(0.3, abs=0.05)
    saved = json.loads((tmp_path / "tasks" / "metrics.json").read_text())
    assert saved["lm_eval"]["opt_mini_lastword"]["acc,none"] == metrics["opt_mini_lastword/acc"]
    assert len(list((tmp_path / "tasks" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_same_config_and_seed_give_bit_identical_metrics(job, tmp_path):
    first = run(job("logger=none", "predictor=dejavu"), tmp_path / "a")
    other_cache = job("logger=none", "predictor=dejavu", f"cache_dir={tmp_path / 'cache2'}")
    assert run(other_cache, tmp_path / "b") == first  # recomputed from scratch: traces, predictor, evaluation


def test_a_job_writes_only_inside_its_output_and_cache_directories(job, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = {p for p in tmp_path.rglob("*")}
    run(job("logger=wandb", "eval.protocols=[token,word]"), tmp_path / "out", tmp_path / "sweep")
    written = {p for p in tmp_path.rglob("*")} - before
    allowed = (tmp_path / "out", tmp_path / "sweep", tmp_path / "cache")
    assert written and all(any(p == a or a in p.parents for a in allowed) for p in written)


@pytest.mark.parametrize("setting", [["eval.protocols=[token,word]"], ["predictor.granularity=token"],
                                     ["eval=tasks", "eval.limit=16"]], ids=["perplexity", "per-token", "tasks"])
def test_a_bfloat16_job_lands_near_float32(compose_cfg, tmp_path, setting):
    """Every stage in bfloat16 on opt-mini (scoring, predictor, masks, both perplexity protocols, per-token masks,
    lm-eval tasks) lands near the float32 job."""
    common = ["+criterion=plainact", "logger=none", "calibration.limit=32", "predictor.head_epochs=10",
              "predictor.neuron_epochs=3", "eval.limit=2", "sparsity=0.5", f"cache_dir={tmp_path / 'cache'}", *setting]
    full = run(compose_cfg(*common), tmp_path / "float32")
    half = run(compose_cfg(*common, "model.dtype=bfloat16"), tmp_path / "bfloat16")
    assert half["achieved_neuron_sparsity"] == pytest.approx(0.5)
    if "eval=tasks" in setting:
        assert half["tasks/mean_acc"] == pytest.approx(full["tasks/mean_acc"], abs=0.1)
        return
    for key in [k for k in full if k.endswith("_perplexity")]:
        assert half[key] == pytest.approx(full[key], rel=0.03), key
