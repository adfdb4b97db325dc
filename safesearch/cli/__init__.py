"""The ``safesearch`` command line: one click group, a module per concept under ``safesearch.cli``.

``main`` runs the group outside click's standalone mode so that every usage error and every
:class:`~safesearch.errors.UserError` ends as one line on stderr and a non-zero exit (2), and an
interrupt (Ctrl-C, or SIGTERM, which is handled like it) as one line and exit 130, whenever it comes,
the imports of the command modules included (see :mod:`safesearch.interrupts`). Every line printed on an error has its URLs' credentials
masked, whatever raised it.
"""

from __future__ import annotations

import sys

import click

from safesearch import __version__, interrupts
from safesearch.errors import UserError
from safesearch.redact import mask_secrets

INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safesearch")
def cli() -> None:
    """Graft safety back into fine-tuned models, searching per-group coefficients with Optuna."""


_registered = False


def _register() -> None:
    """Add the commands (imported here: their modules load torch, transformers, optuna...)."""
    global _registered
    if _registered:
        return
    from safesearch.cli import (
        artifacts,
        dashboard,
        demo,
        eval,
        graft,
        launch,
        storage,
        study,
        suites,
        toyworld,
    )

    cli.add_command(toyworld.toyworld)
    cli.add_command(demo.demo)
    cli.add_command(graft.groups)
    cli.add_command(graft.merge)
    cli.add_command(eval.eval_cmd)
    cli.add_command(suites.suites_cmd)
    cli.add_command(dashboard.dashboard)
    cli.add_command(study.study_group)
    cli.add_command(study.worker)
    cli.add_command(study.run)
    cli.add_command(study.pareto)
    cli.add_command(study.validate)
    cli.add_command(study.export)
    cli.add_command(artifacts.artifacts)
    cli.add_command(launch.launch)
    cli.add_command(storage.storage_group)
    _registered = True


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {mask_secrets(message)}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    # SIGTERM (a scheduler's or `kill`'s stop) ends a command the way Ctrl-C does: the running trial told
    # FAIL and queued again, temporary files removed, one line. The previous handlers come back at the
    # end, for callers that run commands in their own process (tests).
    previous = interrupts.install()
    try:
        with interrupts.blocked():  # torch aborts the process on a signal during its native start-up
            _register()
        cli.main(args=argv, prog_name="safesearch", standalone_mode=False)
        interrupts.raise_if_requested()  # one that Python dropped on the way (see safesearch.interrupts)
    except UserError as e:
        _fail(e.message, e.exit_code)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        sys.exit(2)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except click.exceptions.Abort:
        _fail("interrupted", INTERRUPTED)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", INTERRUPTED)
    finally:
        interrupts.restore(previous)
