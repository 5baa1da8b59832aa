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
    for folder in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                         key=lambda p: (len(p.name), p.name)):
        overrides_file = folder / ".hydra" / "overrides.yaml"
        overrides = _parse_overrides(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else {}
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


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[tuple[str, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _cell(value: float | None, paper: float | None, status: str) -> str:
    ours = f"{value:.1f}" if value is not None else status
    return f"{ours} / {paper:.1f}" if paper is not None else ours


def build_table(sweep_dir: Path, table_name: str | None = None) -> Table:
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
        wanted = {k: str(v) for k, v in (row.get("toy_overrides", row["overrides"]) if toy else row["overrides"]).items()}
        match = next((i for i, job in enumerate(jobs) if i not in used
                      and all(job.overrides.get(k) == v for k, v in wanted.items())), None)
        job = jobs[match] if match is not None else None
        if match is not None:
            used.add(match)
        cells = []
        for col in spec["columns"]:
            paper = row.get("paper", {}).get(col["label"])
            bench = col["toy"] if toy else col["benchmark"]
            value = None
            status = MISSING if job is None else job.status
            if job is not None and job.metrics is not None:
                score = job.metrics.get(bench)
                value = score.get("mIoU") if isinstance(score, dict) else None
                status = "ok" if value is not None else f"no {bench}"
            cells.append(_cell(value, paper, status))
        label = row["label"] + ("" if job is None or job.status == "ok" else f" [{job.status}]")
        table.rows.append((label, cells))
        if job is not None and job.status == FAILED and job.error:
            table.notes.append(f"{row['label']}: {job.error} ({job.folder})")
    extra = [job for i, job in enumerate(jobs) if i not in used]
    for job in extra:
        table.notes.append(f"job {job.folder.name} ({job.overrides}) matches no row of the table")
    table.notes.append("cells: ours / paper, " + spec.get("metric", "mIoU (%)"))
    return table


def render(table: Table, fmt: str = "md") -> str:
    if fmt == "md":
        lines = [f"**{table.title}**", "", "| row | " + " | ".join(table.columns) + " |",
                 "|---|" + "---|" * len(table.columns)]
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
        lines = [r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule",
                 " & ".join(["row", *map(esc, table.columns)]) + r" \\", r"\midrule"]
        lines += [" & ".join([esc(label), *map(esc, cells)]) + r" \\" for label, cells in table.rows]
        lines += [r"\bottomrule", r"\end{tabular}", f"% {esc(table.title)}"]
        return "\n".join(lines) + "\n"
    raise SetupError(f"Unknown table format '{fmt}' (md, tex, csv).")
