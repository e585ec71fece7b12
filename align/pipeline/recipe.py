"""Recipes in Python: ``Recipe`` is a ``Pipeline`` (the recipe read, validated and planned:
``align.pipeline.plan``) that also runs, as ``align run`` does (``align.pipeline.runner``), and reports its
results, as ``align status`` does (``align.pipeline.status``). docs/recipes.md shows it in use::

    recipe = Recipe.load("configs/recipes/quickstart.yaml", profile="test").set("sft.max_steps", 50)
    recipe.plan()                  # what would run, and why
    recipe.run(echo=print)         # returns the exit code of align run
    recipe.results()["metrics"]    # a DataFrame: one row per stage, its key metrics
"""

from __future__ import annotations

from typing import Any, Callable

from align.pipeline.plan import Pipeline, commands, stage_kinds
from align.pipeline.runner import Run
from align.pipeline.status import workdir_status


class Recipe(Pipeline):
    """A loaded, validated recipe that can run. ``Recipe.load(path, profile=, sets=, workdir=)``; see docs/recipes.md."""

    def run(self, force: list[str] | tuple[str, ...] = (), echo: Callable[[str], None] = print) -> int:
        """Run the recipe as ``align run`` does (lock, one child per stage); returns the exit code.
        ``echo`` gets each line of output (the stages' own and the runner's ``align run: ...`` lines)."""
        return Run(self, force, echo=echo).execute()

    def run_stage(self, name: str, force: bool = False) -> int:
        """Run only stage ``name`` (a round name or a base name: all its rounds), if it is not up to date."""
        return Run(self, [name] if force else (), only=name).execute()

    def results(self) -> dict[str, Any]:
        """``{"stages": [status rows], "metrics": DataFrame}``: one row per stage with its key metrics."""
        import pandas as pd

        rows = workdir_status(self.workdir)
        table = pd.DataFrame(
            [
                {
                    "stage": r["name"],
                    "kind": r["kind"],
                    "status": r["status"],
                    **r["metrics"],
                    "duration_s": r["duration_s"],
                }
                for r in rows
            ]
        )
        return {"stages": rows, "metrics": table}


__all__ = ["Recipe", "commands", "stage_kinds"]
