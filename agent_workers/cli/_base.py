"""What every command group shares: settings read once with one-line errors, and the error-catching group."""

from __future__ import annotations

from typing import Any

import click

from agent_workers.config import Settings, unknown_variables
from agent_workers.errors import AgentWorkersError


def settings() -> Settings:
    """``Settings.from_env()``; a bad variable is one line naming the fix, a misspelled one a warning."""
    for name, nearest in unknown_variables():
        hint = f"; did you mean {nearest}?" if nearest else ""
        click.echo(f"warning: {name} is not an agent-workers setting and is ignored{hint}", err=True)
    try:
        return Settings.from_env()
    except AgentWorkersError as exc:
        raise click.ClickException(str(exc)) from None


class Group(click.Group):
    """Turns our errors (and an unreachable service) into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AgentWorkersError as exc:
            fix = ""
            if type(exc).__name__ == "StoreUnavailableError":
                fix = "; start Redis or fix AGENT_WORKERS_PARAMS_URL"
            raise click.ClickException(f"{type(exc).__name__}: {exc}{fix}") from None
        except ConnectionError as exc:  # the builtin: refused, reset
            raise click.ClickException(unreachable(exc)) from None
        except Exception as exc:
            # redis-py and kombu connection errors do not all derive from OSError; name them without importing
            # either library here (start-up time).
            if type(exc).__name__ in {"ConnectionError", "TimeoutError", "OperationalError", "AccessRefused"}:
                raise click.ClickException(unreachable(exc)) from None
            raise


def shown(name: str) -> str:
    """A model or dataset name fit for a terminal: as is when printable, else escaped (``\\x1b``), so a name stored
    before names were checked cannot move the cursor or rewrite the screen."""
    return name if name.isprintable() else ascii(name)[1:-1]


def unreachable(exc: BaseException) -> str:
    return (
        f"cannot reach the broker or Redis ({type(exc).__name__}: {exc}); start them or fix AGENT_WORKERS_BROKER_URL, "
        "AGENT_WORKERS_RESULT_BACKEND and AGENT_WORKERS_PARAMS_URL"
    )
