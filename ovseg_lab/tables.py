"""Paper tables from sweep folders: our numbers beside the paper's.

A table spec (``ovseg_lab/assets/paper_tables/<name>.json``, format in docs/ARCHITECTURE.md) names the rows
by the Hydra overrides that produce them and the columns by benchmark. A Hydra multirun folder holds one
job folder per row (``<n>/.hydra/overrides.yaml``, ``<n>/metrics.json``); jobs that failed or never ran are
marked instead of breaking the table.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ovseg_lab.errors import SetupError

MISSING, FAILED = "missing", "FAILED"


def available_tables() -> list[str]:
    folder = resources.files("ovseg_lab") / "assets" / "paper_tables"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_table_spec(name: str) -> dict[str, Any]:
    path = resources.files("ovseg_lab") / "assets" / "paper_tables" / f"{name}.json"
    if not path.is_file():
        raise SetupError(f"No paper table named '{name}' (known: {available_tables()}).")
    return json.loads(path.read_text())


@dataclass
class Job:
    folder: Path
    overrides: dict[str, str]
    metrics: dict[str, Any] | None
    error: str | None = None

    @property
    def status(self) -> str:
        if self.metrics is not None:
            return "ok"
        return FAILED if (self.folder / "error.txt").exists() or self.error else MISSING


def _parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def read_jobs(sweep_dir: Path) -> list[Job]:
    jobs = []
    for folder in sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()), key=lambda p: (len(p.name), p.name)
    ):
        overrides_file = folder / ".hydra" / "overrides.yaml"
        overrides = (
            _parse_overrides(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else {}
        )
        metrics = None
        metrics_file = folder / "metrics.json"
        if metrics_file.exists():
            try:
                metrics = json.loads(metrics_file.read_text())
            except json.JSONDecodeError:
                metrics = None
        error = (folder / "error.txt").read_text().strip().splitlines()[0] if (folder / "error.txt").exists() else None
        jobs.append(Job(folder, overrides, metrics, error))
    return jobs


def sweep_experiment(sweep_dir: Path) -> tuple[str | None, dict[str, str]]:
    """(experiment name, the sweep's task overrides) from Hydra's multirun.yaml."""
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.exists():
        return None, {}
    cfg = yaml.safe_load(multirun.read_text())
    task = _parse_overrides(cfg.get("hydra", {}).get("overrides", {}).get("task", []) or [])
    experiment = task.get("experiment")
    if experiment is None:  # launched with -m and an experiment chosen inside a defaults list
        experiment = cfg.get("hydra", {}).get("runtime", {}).get("choices", {}).get("experiment")
    return experiment, task


def sweep_table_names(sweep_dir: Path, table_name: str | None = None) -> list[str]:
    """The paper tables a sweep fills: ``table_name``, else the experiment's ``paper_tables`` list (one sweep may
    feed several tables, e.g. LSeg's PASCAL-5i and COCO-20i), else the experiment's own name; ``_toy`` carried over."""
    if table_name:
        return [table_name]
    experiment, _ = sweep_experiment(Path(sweep_dir))
    multirun = Path(sweep_dir) / "multirun.yaml"
    listed = (yaml.safe_load(multirun.read_text()) or {}).get("paper_tables") if multirun.exists() else None
    if listed:
        toy = bool(experiment) and experiment.endswith("_toy")
        return [f"{name}_toy" if toy and not name.endswith("_toy") else name for name in listed]
    if not experiment:
        raise SetupError(f"Cannot tell which paper table {sweep_dir} belongs to (no multirun.yaml); pass --table.")
    return [experiment]


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[tuple[str, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _cell(value: float | None, paper: float | None, status: str) -> str:
    ours = f"{value:.1f}" if value is not None else status
    return f"{ours} / {paper:.1f}" if paper is not None else ours


def build_table(sweep_dir: Path, table_name: str | None = None, shared_sweep: bool = False) -> Table:
    """The paper table ``table_name`` (default: the sweep's experiment) from a sweep folder. ``shared_sweep``: the
    sweep also feeds other tables, so jobs matching none of this table's rows are expected, not noted."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SetupError(f"Sweep folder not found: {sweep_dir}")
    experiment, _ = sweep_experiment(sweep_dir)
    name = table_name or experiment
    if not name:
        raise SetupError(f"Cannot tell which paper table {sweep_dir} belongs to (no multirun.yaml); pass --table.")
    toy = name.endswith("_toy")
    spec = load_table_spec(name[: -len("_toy")] if toy else name)
    jobs = read_jobs(sweep_dir)
    columns = []
    for col in spec["columns"]:
        columns.append(f"{col['label']} (toy: {col['toy']})" if toy else col["label"])
    table = Table(title=spec["title"] + (" - toy benchmarks stand in" if toy else ""), columns=columns)
    used: set[int] = set()
    for row in spec["rows"]:
        wanted = {
            k: str(v) for k, v in (row.get("toy_overrides", row["overrides"]) if toy else row["overrides"]).items()
        }
        # A row's cells may come from several jobs (LSeg's fold tables: one job per fold column).
        candidates = [
            i
            for i, job in enumerate(jobs)
            if i not in used and all(job.overrides.get(k) == v for k, v in wanted.items())
        ]
        failed = [i for i in candidates if jobs[i].status != "ok"]
        cells, suppliers = [], []
        for col in spec["columns"]:
            paper = row.get("paper", {}).get(col["label"])
            bench = col["toy"] if toy else col["benchmark"]
            supplier = next(
                (
                    i
                    for i in candidates
                    if isinstance((jobs[i].metrics or {}).get(bench), dict)
                    and jobs[i].metrics[bench].get("mIoU") is not None
                ),
                None,
            )
            if supplier is not None:
                suppliers.append(supplier)
                cells.append(_cell(jobs[supplier].metrics[bench]["mIoU"], paper, "ok"))
            elif candidates:
                cells.append(_cell(None, paper, jobs[failed[0]].status if failed else f"no {bench}"))
            else:
                cells.append(_cell(None, paper, MISSING))
        # One-job rows take the first matching job; multi-job rows also own their failed jobs.
        row_jobs = set(suppliers) | set(failed) if suppliers else set(candidates[:1])
        used.update(row_jobs)
        status = MISSING if not candidates else (jobs[failed[0]].status if failed and failed[0] in row_jobs else "ok")
        table.rows.append((row["label"] + ("" if status == "ok" else f" [{status}]"), cells))
        for i in sorted(row_jobs):
            if jobs[i].status == FAILED and jobs[i].error:
                table.notes.append(f"{row['label']}: {jobs[i].error} ({jobs[i].folder})")
    extra = [] if shared_sweep else [job for i, job in enumerate(jobs) if i not in used]
    for job in extra:
        table.notes.append(f"job {job.folder.name} ({job.overrides}) matches no row of the table")
    table.notes.append("cells: ours / paper, " + spec.get("metric", "mIoU (%)"))
    return table


def render(table: Table, fmt: str = "md") -> str:
    if fmt == "md":
        lines = [
            f"**{table.title}**",
            "",
            "| row | " + " | ".join(table.columns) + " |",
            "|---|" + "---|" * len(table.columns),
        ]
        lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in table.rows]
        lines += [""] + [f"- {note}" for note in table.notes]
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["row", *table.columns])
        for label, cells in table.rows:
            writer.writerow([label, *cells])
        return buffer.getvalue()
    if fmt == "tex":

        def esc(text: str) -> str:
            return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

        lines = [
            r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
            r"\toprule",
            " & ".join(["row", *map(esc, table.columns)]) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join([esc(label), *map(esc, cells)]) + r" \\" for label, cells in table.rows]
        lines += [r"\bottomrule", r"\end{tabular}", f"% {esc(table.title)}"]
        return "\n".join(lines) + "\n"
    raise SetupError(f"Unknown table format '{fmt}' (md, tex, csv).")
