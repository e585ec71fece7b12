"""``align run RECIPE``, ``align status WORKDIR`` and ``align report WORKDIR`` (docs/recipes.md).

    align run configs/recipes/quickstart.yaml                  # runs what is not up to date
    align run configs/recipes/quickstart.yaml --dry-run        # the plan, with a reason per stage
    align run RECIPE --set sft.max_steps=300 --set vars.k=4    # override keys (repeatable)
    align run RECIPE --profile tiny --force rm                 # a named overlay; rerun rm anyway
    align status runs/quickstart [--json]
    align report runs/quickstart                                # report/heldout.png, rewards.png, report.md

Exit codes (align/core/errors.py): 0 done or nothing to do, 1 a stage failed (its log is named),
2 bad recipe or config (before any work), 3 interrupted (rerun to resume), 75 the workdir is
locked by another run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from align.core.config import BaseConfig, option, parse_config, required
from align.core.errors import ConfigError
from align.core.registry import command


@dataclasses.dataclass
class RunConfig(BaseConfig):
    output_dirs: ClassVar[tuple[str, ...]] = ("workdir",)
    positional: ClassVar[str] = "recipe"
    run_control: ClassVar[tuple[str, ...]] = ()

    recipe: str = required("Recipe YAML (docs/recipes.md), e.g. configs/recipes/quickstart.yaml.")
    workdir: str | None = option(None, "Where the stage folders go; default: the recipe's workdir.")
    set: list[str] = option(
        [], "NAME.key=value overrides of a stage's key (or vars.NAME); repeat the flag for several."
    )
    profile: str | None = option(None, "A named overlay from the recipe's profiles (e.g. tiny).")
    force: list[str] = option([], "Rerun these stages (and what consumes them) even when up to date; repeatable.")
    dry_run: bool = option(False, "Print the plan (what would run and why) and stop.")


def parse_repeatable(cls: type[BaseConfig], argv: list[str]) -> BaseConfig:
    """Like ``parse_config``, but ``--set`` and ``--force`` may be repeated and take each value whole
    (a value may contain commas: ``--set rs.reward=[rule:arithmetic,model:runs/rm/model]``)."""
    collected: dict[str, list[str]] = {"set": [], "force": []}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        name = key[2:] if key.startswith("--") else ""
        if name in collected:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"flag --{name} needs a value (--{name} VALUE)")
                value, i = argv[i + 1], i + 1
            collected[name].append(value)
        else:
            rest.append(argv[i])
        i += 1
    return dataclasses.replace(parse_config(cls, rest), **collected)


@command(
    "run",
    RunConfig,
    "Run a recipe (a whole pipeline), skipping the stages that are up to date.",
    parse=parse_repeatable,
    order=90,
)
def run_recipe(cfg: RunConfig) -> int:
    from rich.console import Console

    from align.pipeline.recipe import Recipe
    from align.pipeline.runner import Run
    from align.pipeline.status import status_table, workdir_status

    recipe = Recipe.load(cfg.recipe, profile=cfg.profile, sets=cfg.set, workdir=cfg.workdir)
    console = Console()
    if cfg.dry_run:
        console.print(plan_table(recipe.plan(cfg.force), f"align run {cfg.recipe} (dry run): {recipe.workdir}"))
        return 0
    code = Run(recipe, cfg.force, echo=lambda line: console.out(line, highlight=False)).execute()
    console.print(status_table(workdir_status(recipe.workdir), f"{recipe.workdir}"))
    return code


def plan_table(rows: list[dict[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("stage", "kind", "action", "reason"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["kind"], row["action"], row["reason"])
    return table


@dataclasses.dataclass
class StatusConfig(BaseConfig):
    positional: ClassVar[str] = "workdir"
    output_dirs: ClassVar[tuple[str, ...]] = ()  # reads only

    workdir: str = required("The workdir of an `align run` (holds run.json).")
    json: bool = option(False, "Print the stages as JSON (for scripts) instead of a table.")


@command(
    "status", StatusConfig, "Show a run's stages: done, stale (why), running, failed, pending; key metric.", order=91
)
def run_status(cfg: StatusConfig) -> int:
    from align.pipeline.status import status_table, workdir_status

    rows = workdir_status(cfg.workdir)
    if cfg.json:
        print(json.dumps(rows, indent=2))
    else:
        from rich.console import Console

        Console().print(status_table(rows, cfg.workdir))
    return 0


@dataclasses.dataclass
class ReportConfig(BaseConfig):
    positional: ClassVar[str] = "workdir"
    output_dirs: ClassVar[tuple[str, ...]] = ("workdir",)  # writes WORKDIR/report/

    workdir: str = required("The workdir of an `align run` (holds run.json).")


@command("report", ReportConfig, "Write PNG plots and a Markdown summary of a run into WORKDIR/report/.", order=92)
def run_report(cfg: ReportConfig) -> int:
    from align.pipeline.status import write_report

    for kind, path in write_report(cfg.workdir).items():
        print(f"{kind}: {path}")
    return 0
