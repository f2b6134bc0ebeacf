"""A W&B workspace for comparing sweeps, the views of ``shadow.report``, created programmatically.

    pip install 'shadow[workspace]'
    python -m shadow.workspace --entity <you> --project shadow [--name comparisons]

Sections: quality (accuracy, perplexity) against the weights read per token, one line per model and method (the
runs grouped by those keys: repeated seeds averaged, their min–max a band); accuracy and perplexity against
sparsity, one line per criterion and per predictor; the predictor's held-out quality; the achieved sparsity.
Every key is one our runs log: flat config keys (``flat_config``) and summary metrics.
"""

from __future__ import annotations

import argparse

READ = "weights_read"
QUALITY = ("tasks/mean_acc", "token_perplexity", "word_perplexity")
PANELS = {  # section → (y metric, group lines by)
    "Accuracy vs sparsity": [("tasks/mean_acc", "criterion"), ("tasks/mean_acc", "predictor")],
    "Perplexity vs sparsity": [("token_perplexity", "criterion"), ("token_perplexity", "predictor"),
                               ("word_perplexity", "criterion"), ("word_perplexity", "predictor")],
    "Predictor quality": [("predictor/heads_val_spearman", "criterion"),
                          ("predictor/neurons_val_spearman", "criterion")],
    "Achieved sparsity": [("achieved_head_sparsity", "policy"), ("achieved_neuron_sparsity", "policy")],
}


def build_workspace(entity: str, project: str, name: str = "shadow comparisons"):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    by_reads = ws.Section(name="Quality against weights read", is_open=True, panels=[
        wr.LinePlot(title=f"{metric} against weights read, by model and method", x=wr.SummaryMetric(READ),
                    y=[wr.SummaryMetric(metric)], groupby_aggfunc="mean", groupby_rangefunc="minmax")
        for metric in QUALITY])  # grouped as the runs are: by model and method
    sections = [by_reads] + [ws.Section(name=title, is_open=True, panels=[
        wr.LinePlot(title=f"{metric} by {key}", x=wr.Config("sparsity"), y=[wr.SummaryMetric(metric)],
                    groupby=wr.Config(key), groupby_aggfunc="mean", groupby_rangefunc="minmax")
        for metric, key in panels]) for title, panels in PANELS.items()]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        runset_settings=ws.RunsetSettings(groupby=[ws.Config("model"), ws.Config("method")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", default="shadow")
    parser.add_argument("--name", default="shadow comparisons")
    args = parser.parse_args()
    workspace = build_workspace(args.entity, args.project, args.name).save()
    print(f"workspace: {workspace.url}")


if __name__ == "__main__":
    main()
