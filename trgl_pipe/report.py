"""Turn run folders into a Markdown report with PNG figures.

    python -m trgl_pipe.report RUN_DIR [RUN_DIR ...] [--out REPORT_DIR] [--title TITLE]
                               [--protocol trgl_pipe|authors]

Runs that differ only in their seed are pooled (mean ± std over seeds). Figures (matplotlib, the
``report`` extra): test accuracy of each module's head against depth (one line per run, VanGL,
TRGL and end-to-end on one plot), training curves per module, λ_k over steps, kinetic energy per
block, and for pipeline runs samples/s and busy/wait time per rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trgl_pipe.errors import UserError
from trgl_pipe.watch.metrics import read_metrics

IGNORED_KEYS = {"seed", "out_dir", "resume", "overwrite", "log", "checkpoint", "debug"}


@dataclass
class Run:
    """One run folder: its config, summary and events."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    suffix: str = ""

    @property
    def label(self) -> str:
        return describe(self.config, self.summary) + self.suffix


def describe(config: dict[str, Any], summary: dict[str, Any]) -> str:
    """A short name: regime, K, VanGL or TRGL with its τ schedule, transport."""
    regime = summary["regime"]
    if regime == "e2e":
        name = "E2E"
    elif regime in ("ddg", "fr"):  # the end-to-end objective with delayed gradients
        name = f"{regime.upper()} K={summary['num_modules']}"
        if config["train"].get("delays", "paper") != "paper":
            name += f" delays={config['train']['delays']}"
    else:
        short = {"parallel": "Par", "sequential": "Seq", "multilap": f"MLS{summary.get('laps', 1)}"}[regime]
        objective = config.get("objective", {})
        aux_type = config.get("aux", {}).get("type", "conv")
        if objective.get("name", "trgl") not in ("trgl", "vangl"):
            # the objective's own label (describe()); runs written before it was recorded: the config's
            method = summary.get("method_label") or other_method(objective)
        elif objective.get("name") == "vangl" or not config["trgl"]["enabled"]:
            method = (
                "VanGL"
                if aux_type == "conv"
                else _OTHER_HEADS.get(aux_type) or f"DGL ({_DGL_HEADS[aux_type]})"
            )
        elif config["trgl"]["tau_schedule"] == "adaptive":
            method = "TRGL-adaptive"
        else:
            method = f"TRGL τ={config['trgl']['tau']:g}" + (
                " halves" if config["trgl"]["tau_schedule"] == "halves" else ""
            )
        name = f"{short} {method} K={summary['num_modules']}"
    split = config["model"]["split"]
    if regime != "e2e" and split != "depth":
        name += f" split={split}"
    if config["data"].get("train_size"):
        name += f" n={config['data']['train_size']}"
    if summary.get("transport") == "dist":
        name += " (pipeline)"
    return name


_DGL_HEADS = {"dgl_cnn": "CNN", "dgl_mlp_sr": "MLP-SR"}
_OTHER_HEADS = {"sedona": "VanGL (SEDONA head)"}  # greedy training with another method's head


def other_method(objective: dict[str, Any]) -> str:
    """The label of a local objective other than TRGL / VanGL."""
    name = objective["name"]
    if name == "infopro":
        loss = objective.get("kwargs", {}).get("loss") or objective.get("infopro_loss") or "softmax"
        return f"InfoPro ({loss})"  # infopro_loss: the key before objective.kwargs
    return {"infopro_l": "InfoProL", "predsim": "PredSim"}.get(name, name)


def load_run(path: Path) -> Run:
    summary_path, config_path = path / "summary.json", path / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        raise UserError(f"{path} is not a finished run folder (summary.json and config.yaml are needed)")
    try:
        summary = json.loads(summary_path.read_text())
        config = yaml.safe_load(config_path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"{path}: unreadable summary.json or config.yaml ({reason})") from error
    _check_run_files(path, summary, config)
    metrics = path / "metrics.jsonl"
    events = read_metrics(metrics) if metrics.is_file() else []
    return Run(path, config, summary, [e for e in events if _well_formed(e)])


SUMMARY_KEYS = ("regime", "num_modules", "modules", "best_module", "best_test_accuracy", "wall_time_s")
CONFIG_SECTIONS = ("model", "data", "trgl")
TRAIN_FIELDS = ("module", "step", "epoch")


def _check_run_files(path: Path, summary: Any, config: Any) -> None:
    """A report reads these keys: say which file lacks one instead of failing in a table."""
    if not isinstance(summary, dict):
        raise UserError(f"{path / 'summary.json'} holds a {type(summary).__name__}, not a run summary")
    if not isinstance(config, dict):
        raise UserError(f"{path / 'config.yaml'} holds a {type(config).__name__}, not a run config")
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing or not isinstance(summary["modules"], list):
        raise UserError(
            f"{path / 'summary.json'} lacks {', '.join(missing) or 'modules'}; is it a trgl_pipe run?"
        )
    missing = [k for k in CONFIG_SECTIONS if not isinstance(config.get(k), dict)]
    if missing or "seed" not in config:
        raise UserError(
            f"{path / 'config.yaml'} lacks {', '.join(missing) or 'seed'}; is it a trgl_pipe run?"
        )


def _well_formed(event: dict) -> bool:
    """An event the report can plot (a damaged metrics.jsonl loses lines, not the report)."""
    if event.get("event") != "train":
        return "event" in event
    counts = all(isinstance(event.get(k), int) for k in TRAIN_FIELDS)
    return counts and all(isinstance(event.get(k), (int, float)) for k in ("accuracy", "samples"))


def order(run: Run) -> tuple:
    """Table order: regime, then K, then VanGL before TRGL (by τ), bigger training sets first."""
    regimes = {"e2e": 0, "parallel": 1, "sequential": 2, "multilap": 3, "ddg": 4, "fr": 5}
    trgl = run.config["trgl"]
    objective = run.config.get("objective", {}).get("name", "trgl")
    method = (
        (3, describe(run.config, run.summary))  # the other objectives after TRGL, by name
        if objective not in ("trgl", "vangl")
        else (0, 0.0)
        if not trgl["enabled"] or objective == "vangl"
        else (2, 0.0)
        if trgl["tau_schedule"] == "adaptive"
        else (1, trgl["tau"])
    )
    size = run.config["data"].get("train_size") or 10**12
    return (
        regimes[run.summary["regime"]],
        run.summary["num_modules"],
        method,
        -size,
        run.summary.get("transport"),
    )


def group_key(run: Run) -> str:
    stripped = {k: v for k, v in run.config.items() if k not in IGNORED_KEYS}
    stripped.setdefault("transport", run.summary.get("transport"))
    return json.dumps(stripped, sort_keys=True, default=str)


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std``; a single seed has no std (an equal pair shows ± 0)."""
    if mean is None:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def summary_rows(groups: dict[str, list[Run]]) -> list[dict[str, str]]:
    rows = []
    for runs in groups.values():
        s0 = runs[0].summary
        best = [r.summary["best_test_accuracy"] for r in runs]
        best_val = [r.summary["best_val_accuracy"] for r in runs]
        last = [r.summary["last_module_test_accuracy"] for r in runs]
        wall = [r.summary["wall_time_s"] for r in runs]
        peak = [r.summary.get("peak_memory_bytes") or None for r in runs]
        modules = [str(r.summary["best_module"]) for r in runs]
        rows.append(
            {
                "run": runs[0].label,
                "seeds": str(len(runs)),
                "best module": ",".join(modules),
                "best val %": fmt(*mean_std(best_val)),
                "best test %": fmt(*mean_std(best)),
                "last module test %": fmt(*mean_std(last)),
                "wall s": fmt(*mean_std(wall), scale=1, digits=0),
                "peak MiB": fmt(*mean_std(peak), scale=1 / 2**20, digits=0),
                "K": str(s0["num_modules"]),
            }
        )
    return rows


PROTOCOLS = ("trgl_pipe", "authors")


def authors_best_test(run: Run) -> float | None:
    """The authors' reported number: the highest test accuracy over every evaluation of every module.

    Their scripts test every epoch and keep the maximum over epochs and modules, which chooses
    on the test set (an optimistic estimate). trgl_pipe's own number, the default, is the test
    accuracy at the last evaluation of the module chosen on validation.
    """
    values = [
        h["test_accuracy"]
        for m in run.summary.get("modules", [])
        for h in m.get("history") or []
        if h.get("test_accuracy") is not None
    ]
    return max(values) if values else None


def authors_rows(groups: dict[str, list[Run]]) -> list[dict[str, str]]:
    """Both protocols side by side, one row per group (mean ± std over seeds)."""
    rows = []
    for runs in groups.values():
        evaluations = {len(m.get("history") or []) for r in runs for m in r.summary.get("modules", [])}
        rows.append(
            {
                "run": runs[0].label,
                "seeds": str(len(runs)),
                "evaluations per module": ",".join(map(str, sorted(evaluations))),
                "authors' protocol: highest test % (epochs × modules)": fmt(
                    *mean_std([authors_best_test(r) for r in runs])
                ),
                "trgl_pipe protocol: test % of the module best on validation, last evaluation": fmt(
                    *mean_std([r.summary["best_test_accuracy"] for r in runs])
                ),
            }
        )
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(out)


def module_table(groups: dict[str, list[Run]]) -> str:
    """Per-module test accuracy (mean over seeds) of every group."""
    width = max(r.summary["num_modules"] for runs in groups.values() for r in runs)
    header = ["run", *[f"m{k}" for k in range(width)]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for runs in groups.values():
        cells = [runs[0].label]
        for k in range(width):
            values = [r.summary["modules"][k]["test_accuracy"] for r in runs if k < len(r.summary["modules"])]
            cells.append(fmt(*mean_std(values), digits=1) if values else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def t_quantile(df: int, comparisons: int = 1, coverage: float = 0.95) -> float:
    """The two-sided Student's t quantile of a ``coverage`` interval with ``df`` degrees of
    freedom; with ``comparisons`` > 1, Bonferroni's: each interval at 1 − (1 − coverage)/m, so the
    m intervals of a table cover together with probability ``coverage`` at least."""
    from scipy.stats import t

    return float(t.ppf(1 - (1 - coverage) / (2 * comparisons), df))


def t_half_width(diffs: list[float], comparisons: int = 1) -> float | None:
    """Half-width of the 95% t interval of the mean of paired differences (None for one pair);
    Bonferroni-adjusted for ``comparisons`` intervals read together."""
    if len(diffs) < 2:
        return None
    return t_quantile(len(diffs) - 1, comparisons) * statistics.stdev(diffs) / len(diffs) ** 0.5


def contains_zero(mean: float, half: float) -> bool:
    return mean - half <= 0 <= mean + half


# What makes a local method: the sections and keys a method's runs may differ in from VanGL's
METHOD_KEYS: dict[str, tuple[str, ...] | None] = {"trgl": None, "objective": None, "aux": ("type",)}


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every key it lacks set to today's default.

    A run folder written before a key existed ran with the behaviour that key's default keeps, so
    an older VanGL run still pairs with a newer method's run that differs from it only in method keys.
    """
    from trgl_pipe.config import Config

    full = Config().to_dict()
    for section, values in config.items():
        if isinstance(values, dict) and isinstance(full.get(section), dict):
            full[section] = {**full[section], **values}
        else:
            full[section] = values
    return full


def _without_method(config: dict[str, Any]) -> str:
    trimmed = {k: v for k, v in _with_defaults(config).items() if k not in IGNORED_KEYS}
    for section, keys in METHOD_KEYS.items():
        trimmed[section] = {
            k: v for k, v in trimmed.get(section, {}).items() if keys is not None and k not in keys
        }
    return json.dumps(trimmed, sort_keys=True, default=str)


def is_vangl(run: Run) -> bool:
    """Plain greedy training: a local regime, cross-entropy only, the conv auxiliary head."""
    config = _with_defaults(run.config)
    name = config["objective"]["name"]
    plain = name == "vangl" or (name == "trgl" and not config["trgl"]["enabled"])
    local = run.summary["regime"] in ("parallel", "sequential", "multilap")
    return plain and local and config["aux"]["type"] == "conv"


def paired_rows(groups: dict[str, list[Run]]) -> list[dict[str, str]]:
    """Each local method − VanGL of the best module's test accuracy, paired by seed (the same data
    subset and initial weights), for every group whose VanGL twin differs only in method keys
    (the trgl and objective sections, ``aux.type``): TRGL, InfoPro, PredSim, DGL's heads.

    The interval is mean ± t·sd/√n over the seeds' differences (a paired t interval, exact
    quantile, n ≥ 2 pairs), once at 95% and once Bonferroni-adjusted for the m intervals the
    table shows together; the row reads "noise" when the adjusted one contains 0.
    """
    vangl: dict[str, list[Run]] = {}
    for runs in groups.values():
        if is_vangl(runs[0]):
            vangl.setdefault(_without_method(runs[0].config), []).extend(runs)
    found: list[tuple[str, list[float]]] = []
    for runs in groups.values():
        if is_vangl(runs[0]) or runs[0].summary["regime"] not in ("parallel", "sequential", "multilap"):
            continue
        twin = vangl.get(_without_method(runs[0].config))
        if twin is None:
            continue
        by_seed = {r.config["seed"]: r.summary["best_test_accuracy"] for r in twin}
        diffs = [
            100 * (r.summary["best_test_accuracy"] - by_seed[r.config["seed"]])
            for r in runs
            if r.config["seed"] in by_seed
        ]
        if diffs:
            found.append((f"{runs[0].label} − VanGL", diffs))
    m = sum(1 for _, diffs in found if len(diffs) > 1)  # the intervals the table shows together
    rows = []
    for comparison, diffs in found:
        mean = statistics.fmean(diffs)
        row = {
            "comparison": comparison,
            "pairs": str(len(diffs)),
            "per seed": ", ".join(f"{d:+.2f}" for d in diffs),
            "mean": f"{mean:+.2f}",
            "95% interval": "-",
            f"Bonferroni interval (m={m})": "-",
            "reading": "one seed: no interval",
        }
        half, adjusted = t_half_width(diffs), t_half_width(diffs, m)
        if half is not None and adjusted is not None:
            row["95% interval"] = f"{mean - half:+.2f} to {mean + half:+.2f}"
            row[f"Bonferroni interval (m={m})"] = f"{mean - adjusted:+.2f} to {mean + adjusted:+.2f}"
            row["reading"] = "noise (contains 0)" if contains_zero(mean, adjusted) else "beyond noise"
            if not contains_zero(mean, half) and contains_zero(mean, adjusted):
                row["reading"] += "; excludes 0 unadjusted"
        rows.append(row)
    return rows


def rank_table(runs: list[Run]) -> str:
    """Per-rank throughput, busy and wait times of the pipeline runs (empty if there are none)."""
    rows = [
        {
            "run": f"{run.label}, seed {run.config['seed']}",
            "rank": str(r["rank"]),
            "samples/s": f"{r['samples_per_s']:.0f}",
            "compute s": f"{r['compute_s']:.1f}",
            "waiting for input s": f"{r['recv_wait_s']:.1f}",
            "waiting for room s": f"{r['send_wait_s']:.1f}",
            "peak MiB": fmt(r.get("peak_memory_bytes"), None, scale=1 / 2**20, digits=0),
        }
        for run in runs
        if run.summary.get("world_size", 1) > 1
        for r in run.summary["ranks"]
    ]
    return markdown_table(rows) if rows else ""


# ---------------------------------------------------------------------------------------------
# Figures


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path, *axes, legend_cols: int = 1) -> bool:
    """Grid and legend on each axis, then write the figure and free it (every plot ends here)."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=legend_cols)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy_vs_depth(groups: dict[str, list[Run]], path: Path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for runs in groups.values():
        modules = runs[0].summary["modules"]
        depth = [m["blocks"][1] for m in modules]
        means, stds = [], []
        for k in range(len(modules)):
            m, s = mean_std([r.summary["modules"][k]["test_accuracy"] for r in runs])
            means.append(100 * m)
            stds.append(100 * (s or 0))
        style = "o-" if len(depth) > 1 else "s"
        ax.errorbar(
            depth, means, yerr=stds if len(runs) > 1 else None, fmt=style, capsize=3, label=runs[0].label
        )
    ax.set_xlabel("residual blocks up to the end of the module (depth)")
    ax.set_ylabel("test accuracy of the module's head (%)")
    ax.set_title("Accuracy of each module against depth")
    return _save(fig, path, ax)


def _series(run: Run, key: str) -> dict[int, list[tuple[int, float]]]:
    series: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for e in run.events:
        if e.get("event") == "train" and e.get(key) is not None:
            series[e["module"]].append((e["step"], e[key]))
    return series


def plot_curves(run: Run, key: str, ylabel: str, path: Path, log: bool = False) -> bool:
    plt = _plt()
    series = _series(run, key)
    if plt is None or not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for module, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"module {module}")
    ax.set_xlabel("training step of the module")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(run.label)
    return _save(fig, path, ax, legend_cols=2)


def plot_block_kinetic(groups: dict[str, list[Run]], path: Path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for runs in groups.values():
        values: list[float] = []
        for m in runs[0].summary["modules"]:
            values.extend(m.get("block_kinetic_energy") or [])
        if values:
            ax.plot(range(len(values)), values, ".-", label=runs[0].label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("residual block")
    ax.set_ylabel("kinetic energy mean_b ||r||² (validation)")
    ax.set_yscale("log")
    ax.set_title("Kinetic energy per block at the end of training")
    return _save(fig, path, ax)


def plot_ranks(run: Run, path: Path) -> bool:
    plt = _plt()
    ranks = run.summary.get("ranks", [])
    if plt is None or run.summary.get("transport") != "dist" or not ranks:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [str(r["rank"]) for r in ranks]
    left.bar(names, [r["samples_per_s"] for r in ranks])
    left.set_xlabel("rank")
    left.set_ylabel("samples/s")
    bottom = [0.0] * len(ranks)
    for key, label in (
        ("compute_s", "compute"),
        ("recv_wait_s", "waiting for input"),
        ("send_wait_s", "waiting for room downstream"),
    ):
        values = [r[key] for r in ranks]
        right.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xlabel("rank")
    right.set_ylabel("seconds")
    right.legend(fontsize=7)
    fig.suptitle(run.label)
    return _save(fig, path)


def plot_timeline(run: Run, path: Path) -> bool:
    """The Gantt chart of a window of steps of a pipeline run that recorded its spans."""
    if not (run.path / "spans").is_dir() or _plt() is None:
        return False
    from trgl_pipe.timeline import default_window, draw_gantt, load_tracks

    tracks = load_tracks(run.path)
    window = default_window(tracks)
    draw_gantt(tracks, path, window, f"{run.label}: {window[1]:.2f} s from {window[0]:.2f} s")
    return True


def _final_train_accuracy(run: Run) -> dict[int, float]:
    """Each module's training accuracy over its last epoch (the running average of that epoch)."""
    train = [e for e in run.events if e["event"] == "train"]
    last_epoch = max((e["epoch"] for e in train), default=0)
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in train:
        if e["epoch"] == last_epoch:
            sums[e["module"]][0] += e["accuracy"] * e["samples"]
            sums[e["module"]][1] += e["samples"]
    return {m: a / n for m, (a, n) in sums.items() if n}


def plot_train_vs_val(groups: dict[str, list[Run]], path: Path) -> bool:
    """Train (last epoch) and validation accuracy of every module, at the largest K of the runs:
    where a module overfits, the two part."""
    plt = _plt()
    if plt is None:
        return False
    k_max = max(r.summary["num_modules"] for runs in groups.values() for r in runs)
    chosen = [runs for runs in groups.values() if runs[0].summary["num_modules"] == k_max > 1]
    if not chosen:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for runs in chosen:
        train = [
            statistics.fmean(_final_train_accuracy(r).get(m, float("nan")) for r in runs)
            for m in range(k_max)
        ]
        val = [statistics.fmean(r.summary["modules"][m]["val_accuracy"] for r in runs) for m in range(k_max)]
        line = ax.plot(range(k_max), [100 * v for v in val], marker="o", label=f"{runs[0].label}: validation")
        ax.plot(
            range(k_max),
            [100 * t for t in train],
            ls="--",
            color=line[0].get_color(),
            label=f"{runs[0].label}: train (last epoch)",
        )
    ax.set_xlabel("module")
    ax.set_ylabel("accuracy %")
    return _save(fig, path, ax)


def _slug(text: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in text).strip("_").lower()[:60]


def build_report(paths: list[Path], out: Path, title: str, protocol: str = "trgl_pipe") -> Path:
    runs = sorted((load_run(p) for p in paths), key=order)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    labels = [g[0].label for g in groups.values()]
    for runs_of_group in groups.values():  # two groups with one name: tell them apart by folder
        if labels.count(runs_of_group[0].label) > 1:
            for run in runs_of_group:
                run.suffix = f" [{run.path.name}]"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {title}",
        "",
        f"{len(runs)} runs in {len(groups)} groups (runs that differ only in seed "
        "are pooled: mean ± standard deviation over seeds). Accuracies in %.",
        "",
    ]
    lines += ["## Runs", "", markdown_table(summary_rows(groups)), ""]
    lines += ["## Test accuracy of every module", "", module_table(groups), ""]
    if protocol == "authors":
        lines += [
            "## The authors' protocol (chooses on the test set)",
            "",
            "The authors' scripts report the highest test accuracy over every evaluation and every "
            "module; that maximum is taken on the test set itself, so it is optimistic and grows with "
            "the number of evaluations. Beside it, trgl_pipe's own number (every other table here): "
            "the module chosen on validation, at the last evaluation.",
            "",
            markdown_table(authors_rows(groups)),
            "",
        ]
    if paired := paired_rows(groups):
        lines += [
            "## Each method − VanGL, paired by seed",
            "",
            "Best module's test accuracy, points. The seed fixes the data subset and the initial "
            "weights, so the two runs of a seed differ only in the local objective (and head). "
            "Intervals: paired t (exact quantiles); the reading uses the Bonferroni interval, which "
            "holds for the table's m comparisons together (each at 1 − 0.05/m).",
            "",
            markdown_table(paired),
            "",
        ]
    if ranks := rank_table(runs):
        lines += ["## Pipeline ranks", "", ranks, ""]
    figures = []
    if plot_accuracy_vs_depth(groups, out / "accuracy_vs_depth.png"):
        figures.append(("Test accuracy of each module's head against depth", "accuracy_vs_depth.png"))
    if plot_train_vs_val(groups, out / "train_vs_val.png"):
        figures.append(("Train and validation accuracy of every module (largest K)", "train_vs_val.png"))
    if plot_block_kinetic(groups, out / "kinetic_per_block.png"):
        figures.append(("Kinetic energy per block", "kinetic_per_block.png"))
    slugs: set[str] = set()
    for group in groups.values():
        run = group[0]
        slug = base = _slug(run.label)
        while slug in slugs:  # labels that differ only past the slug's length
            slug = f"{base}_{len(slugs)}"
        slugs.add(slug)
        if plot_curves(run, "ce", "training cross-entropy", out / f"curves_{slug}.png", log=True):
            figures.append((f"Training curves per module: {run.label}", f"curves_{slug}.png"))
        if plot_curves(run, "lambda", "λ_k", out / f"lambda_{slug}.png"):
            figures.append((f"λ_k over steps: {run.label}", f"lambda_{slug}.png"))
        if plot_ranks(run, out / f"ranks_{slug}.png"):
            figures.append((f"Pipeline ranks: {run.label}", f"ranks_{slug}.png"))
        if plot_timeline(run, out / f"timeline_{slug}.png"):
            figures.append((f"Timeline of the ranks, a window of steps: {run.label}", f"timeline_{slug}.png"))
    if figures:
        lines += ["## Figures", ""]
        for caption, name in figures:
            lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    else:
        lines += ["(No figures: install matplotlib, e.g. `pip install -e .[report]`.)", ""]
    lines += ["## Sources", ""] + [f"- `{r.path}`: {r.label}, seed {r.config['seed']}" for r in runs]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trgl_pipe.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (out_dir of finished runs)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="folder for report.md and figures")
    parser.add_argument("--title", default="trgl_pipe report")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="trgl_pipe",
        help="authors: add the authors' number (highest test accuracy over evaluations and modules)",
    )
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(
            f"error: --out {args.out} is a file; name a folder for report.md and its figures", file=sys.stderr
        )
        return 2
    try:
        report = build_report(args.runs, args.out, args.title, args.protocol)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
