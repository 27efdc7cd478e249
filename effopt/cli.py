"""effopt command line. Thin: check flags, call a library function, print.

Exit codes: 0 done; 1 a gate failed; 2 invalid input (recipe, option, file), nothing ran;
3 a stage failed at run time. torch and transformers are imported inside commands only.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress and adapt LLM checkpoints with YAML recipes, and measure what it bought.")

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_STAGE = 0, 1, 2, 3


def _fail(message: str, code: int) -> None:
    from effopt import log

    log.error(message)
    raise typer.Exit(code)


def _default_output(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def _latest_run(name: str) -> Path | None:
    found = sorted(Path("runs").glob(f"{name}-*/run.json"))
    return found[-1].parent if found else None


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run directory (default runs/NAME-TIMESTAMP)."),
    model: Optional[str] = typer.Option(None, "--model", help="Override the load stage's source."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe key: --set stages.2.bits=4 (repeatable)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Processes per training stage (finetune, "
                                        "distill) through torch.distributed: one per GPU on CUDA, gloo on CPU."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output (default: the latest of this "
                                                        "recipe's name) from its last checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print run.json's summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (log.txt still has it)."),
) -> None:
    """Run a recipe's stages in order and write a run directory."""
    from effopt import log
    from effopt.errors import InputError, StageError
    from effopt.recipe import load_recipe

    log.set_quiet(quiet)
    try:
        parsed = load_recipe(recipe, set_, model)
        if nproc is not None:
            from effopt.training.distributed import set_nproc

            set_nproc(parsed, nproc)
    except InputError as exc:
        _fail(str(exc), EXIT_INPUT)
    run_dir = output
    if run_dir is None:
        run_dir = _latest_run(parsed.name) if resume else _default_output(parsed.name)
        if run_dir is None:
            _fail(f"--resume: no earlier run of {parsed.name!r} under runs/; pass --output DIR", EXIT_INPUT)
    from effopt.pipeline import run_recipe

    log.info(f"run directory: {run_dir}")
    try:
        record = run_recipe(parsed, run_dir, resume=resume)
    except InputError as exc:
        _fail(str(exc), EXIT_INPUT)
    except StageError as exc:
        if as_json:
            log.stdout(json.dumps(_summary(run_dir), indent=2))
        _fail(f"{exc}\n  run record: {run_dir / 'run.json'} (resume with --resume --output {run_dir})", EXIT_STAGE)
    if as_json:
        log.stdout(json.dumps(_summary(run_dir), indent=2))
    else:
        from effopt.report import eval_rows, to_rich_table

        log.console.print(to_rich_table(eval_rows(run_dir)))
    failed = [g for g in record["gates"] if not g["passed"]]
    for gate in record["gates"]:
        (log.info if gate["passed"] else log.error)(f"gate {gate['gate']}: {'passed' if gate['passed'] else gate['reason']}")
    if failed:
        raise typer.Exit(EXIT_GATE)


def _summary(run_dir: Path) -> dict:
    from effopt.rundir import read_run

    record = read_run(run_dir)
    return {"run_dir": str(run_dir), "status": record["status"], "seconds": record["seconds"],
            "stages": [{k: s[k] for k in ("index", "stage", "label", "status", "seconds", "peak_rss_mb", "metrics",
                                          "error")} for s in record["stages"]],
            "gates": record["gates"]}


@app.command()
def validate(recipes: List[Path] = typer.Argument(..., help="Recipe files."),
             set_: List[str] = typer.Option([], "--set", help="Overrides, as for run.")) -> None:
    """Validate recipes without running anything (exit 2 on the first invalid one)."""
    from effopt import log
    from effopt.errors import InputError
    from effopt.recipe import load_recipe

    bad = 0
    for path in recipes:
        try:
            load_recipe(path, set_)
            log.console.print(f"[green]ok[/green] {path}")
        except InputError as exc:
            log.error(str(exc))
            bad += 1
    if bad:
        raise typer.Exit(EXIT_INPUT)


@app.command()
def schema() -> None:
    """Print the JSON Schema of recipes (for editors)."""
    from effopt import log
    from effopt.recipe import json_schema

    log.stdout(json.dumps(json_schema(), indent=2))


@app.command()
def stages(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List every stage and method with its options and defaults (generated from the schema)."""
    from effopt import log
    from effopt.registry import stages as registered

    listing = []
    for spec in registered().values():
        for cfg in spec.configs:
            method = cfg.model_fields["method"].default if "method" in cfg.model_fields else None
            options = []
            for name, field in cfg.model_fields.items():
                if name in ("stage", "method"):
                    continue
                default = field.get_default(call_default_factory=True)
                options.append({"name": name, "type": _type_name(field.annotation), "default": default,
                                "required": field.is_required(), "help": field.description or ""})
            listing.append({"stage": spec.name, "method": method, "summary": spec.summary,
                            "doc": (cfg.__doc__ or "").strip(), "options": options})
    if as_json:
        log.stdout(json.dumps(listing, indent=2, default=str))
        return
    from rich.markup import escape
    from rich.table import Table

    for item in listing:
        title = item["stage"] + (f" / method: {item['method']}" if item["method"] else "")
        table = Table(title=escape(f"{title} — {item['doc'] or item['summary']}"), title_justify="left")
        for col in ("option", "type", "default", "description"):
            table.add_column(col)
        for opt in item["options"]:
            table.add_row(*(escape(str(v)) for v in (opt["name"], opt["type"], "(required)" if opt["required"]
                                                      else repr(opt["default"]), opt["help"])))
        log.console.print(table)


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="Run directories."),
    format: str = typer.Option("table", "--format", "-f", help="table | md | json | html | png"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout "
                                                                       "(png: into this folder)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Run directory to compare with (e.g. "
                                                                     "yesterday's nightly run)."),
    fail_on: List[str] = typer.Option([], "--fail-on", help="Regression rule, repeatable: 'perplexity>+2%', "
                                      "'size>+0%', 'tokens_per_s<-10%' (vs --baseline), 'perplexity>30'. "
                                      "Exit 1 when one fails."),
) -> None:
    """Compare runs: one row per run and eval point; with --fail-on, exit 1 on a regression."""
    from effopt import log
    from effopt.report import compare, parse_rule, render, to_rich_table, write_plots

    if format not in ("table", "md", "json", "html", "png"):
        _fail(f"--format: expected table, md, json, html or png, got {format!r}", EXIT_INPUT)
    if format == "png" and output is None:
        _fail("--format png writes one file per plot: pass --output DIR", EXIT_INPUT)
    try:
        rules = [parse_rule(text) for text in fail_on]
    except ValueError as exc:
        _fail(str(exc), EXIT_INPUT)
    relative = [r.text for r in rules if r.kind != "absolute"]
    if relative and baseline is None:
        _fail(f"--fail-on {relative[0]!r} compares with a baseline: pass --baseline RUN_DIR", EXIT_INPUT)
    for run_dir in [*runs, *([baseline] if baseline is not None else [])]:
        if not (run_dir / "run.json").is_file():
            _fail(f"{run_dir}: not an effopt run directory (no run.json)", EXIT_INPUT)
    try:
        result = compare(runs, baseline, rules)
    except ValueError as exc:
        _fail(str(exc), EXIT_INPUT)
    if format == "png":
        for name, path in write_plots(result, output).items():
            (log.info if path else log.warn)(f"wrote {path}" if path else f"{name}: no run measured this; no plot")
    elif format == "table" and output is None:
        log.console.print(to_rich_table(result["rows"]))
    elif output is not None:
        output.write_text(render(result, "md" if format == "table" else format), encoding="utf-8")
        log.info(f"wrote {output}")
    else:
        log.stdout(render(result, format))
    checks = result["checks"]
    failed = [c for c in checks or [] if not c["passed"]]
    for check in failed:
        log.error(f"regression: {check['run']}: {check['message']}")
    if checks:
        log.info(f"regression checks: {len(checks) - len(failed)} of {len(checks)} passed")
    if failed:
        raise typer.Exit(EXIT_GATE)


from effopt.cli_bench import bench  # noqa: E402
app.command()(bench)


def main() -> None:
    """Console-script entry point."""
    from effopt import hostmem

    hostmem.configure()  # huge-page CPU allocations, set before torch is imported (effopt/hostmem.py)
    app()


if __name__ == "__main__":
    main()
