"""Ops commands: `flask --app receiver <command>`."""

from __future__ import annotations

import sys

import click
from flask import Flask

from .client import RMClient, RMNotConfigured
from .runtime import current_runtime


def _client() -> RMClient:
    try:
        return RMClient.from_settings(current_runtime().settings)
    except RMNotConfigured as exc:
        raise click.ClickException(f"RM credentials missing: {exc.message}") from None


@click.command("reconcile")
@click.option("--code", "codes", multiple=True, help="Check just this voucher code (repeatable), final or not.")
def reconcile_command(codes: tuple[str, ...]) -> None:
    """Run one reconciliation pass now (the scheduler's selection, or just --code)."""
    from .reconciliation import reconcile_codes
    from .scheduler import run_reconcile_under_lease

    runtime = current_runtime()
    client = _client()
    if codes:
        summary = reconcile_codes(
            runtime.sessions, client, list(dict.fromkeys(codes)),
            concurrency=runtime.settings.reconcile_concurrency, trigger="cli",
        )
    else:
        summary = run_reconcile_under_lease(runtime, client, trigger="cli")
        if summary is None:
            raise click.ClickException("another reconciliation is running (the 'reconcile' lease is held); try later")
    click.echo(summary.line())
    if summary.error or summary.failed:
        sys.exit(1)


@click.command("scheduler")
def scheduler_command() -> None:
    """Run the APScheduler loop in the foreground (reconciliation every RECONCILE_INTERVAL_SECONDS)."""
    from .scheduler import run_forever

    run_forever(current_runtime())


@click.command("backfill")
@click.option("--restart", is_flag=True, help="Forget saved progress and walk every batch again.")
def backfill_command(restart: bool) -> None:
    """Walk RM's voucher batches and their vouchers into the database (resumable, idempotent)."""
    from .backfill import backfill

    runtime = current_runtime()
    client = _client()
    with click.progressbar(length=0, label="backfill", show_pos=True, file=sys.stderr) as bar:

        def on_page(_batch: str, count: int) -> None:
            bar.length = (bar.length or 0) + count
            bar.update(count)

        summary = backfill(runtime.sessions, client, restart=restart, on_page=on_page)
    click.echo(summary.line())


def register(app: Flask) -> None:
    """Attach every ops command to the app's CLI."""
    for command in (reconcile_command, scheduler_command, backfill_command):
        app.cli.add_command(command)
