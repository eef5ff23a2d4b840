"""The `mergesmith` command: each subcommand is a thin call into the library (one module per
group: merging, evaluating, building, side_outputs; common.py holds the app)."""

from __future__ import annotations

import sys

import typer

from mergesmith import __version__
from mergesmith.cli.common import _state, app, err, out
from mergesmith.engine.allocator import keep_freed_memory
from mergesmith.errors import MergesmithError
from mergesmith.cli import merging, evaluating, building, side_outputs  # noqa: F401 (they register the commands, in this order)


def _version(value: bool) -> None:
    if value:
        out.print(f"mergesmith {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the merge unwinds as for Ctrl-C (a
    BaseException, so that no `except Exception` on the way swallows it)."""


def _terminate(signum, frame) -> None:
    raise _Terminated()


def _interrupted(argv: list[str], code: int) -> None:
    command = [a for a in argv if not a.startswith("-")][:2]
    resumable = command[:1] in (["merge"], ["search"]) or command[1:] == ["apply"]
    err.print("interrupted" + ("; rerun the same command with --resume to continue"
                               if resumable else ""), highlight=False)
    sys.exit(code)


def main() -> None:
    import atexit
    import gc
    import signal

    keep_freed_memory()  # every command allocates and frees large tensors over and over
    # torch's and transformers' modules live until exit, where the collector would walk their
    # ~340k objects once more: ~0.5 s of a 1B MoE build's 6 (bench/README.md, MoE build)
    atexit.register(gc.freeze)
    argv = sys.argv[1:]
    if "--debug" in argv:  # accepted anywhere on the line, not only before the command
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(args=argv, prog_name="mergesmith", standalone_mode=False)
    except _Terminated:
        _interrupted(argv, 128 + signal.SIGTERM)
    except MergesmithError as exc:
        if _state["debug"]:
            raise
        # plain print: one line however narrow the terminal, easy to grep in logs
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted(argv, 130)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except Exception as exc:  # click's usage errors come through here with standalone_mode off
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
    # typer turns Ctrl-C into a returned 130 when it does not exit itself
    if code == 130:
        _interrupted(argv, 130)
    sys.exit(code if isinstance(code, int) else 0)

