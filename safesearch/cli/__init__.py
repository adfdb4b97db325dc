"""The ``safesearch`` command line: one click group, a module per concept under ``safesearch.cli``.

``main`` runs the group outside click's standalone mode so that every usage error and every
:class:`~safesearch.errors.UserError` ends as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

import click

from safesearch import __version__
from safesearch.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safesearch")
def cli() -> None:
    """Graft safety back into fine-tuned models, searching per-group coefficients with Optuna."""


def _register() -> None:
    # Imported here so that each command module stays importable on its own.
    from safesearch.cli import demo, eval, graft, toyworld

    cli.add_command(toyworld.toyworld)
    cli.add_command(demo.demo)
    cli.add_command(graft.groups)
    cli.add_command(graft.merge)
    cli.add_command(eval.eval_cmd)

    from safesearch.cli import dashboard

    cli.add_command(dashboard.dashboard)

    from safesearch.cli import study

    cli.add_command(study.study_group)
    cli.add_command(study.worker)
    cli.add_command(study.run)
    cli.add_command(study.pareto)
    cli.add_command(study.validate)
    cli.add_command(study.export)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="safesearch", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
