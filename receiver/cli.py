"""Ops commands: `flask --app receiver <command>`."""

from __future__ import annotations

import json
import sys

import click
from flask import Flask
from flask.cli import AppGroup, with_appcontext

from .client import RMClient, RMNotConfigured
from .runtime import current_runtime


def _client() -> RMClient:
    try:
        return current_runtime().rm_client()
    except RMNotConfigured as exc:
        raise click.ClickException(f"RM credentials missing: {exc.message}") from None


@click.command("reconcile")
@with_appcontext
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
        def progress(running) -> None:  # noqa: ANN001
            click.echo(f"  ... checked {running.checked}, changed {running.changed}, failed {running.failed}", err=True)

        summary = run_reconcile_under_lease(runtime, client, trigger="cli", on_progress=progress)
        if summary is None:
            raise click.ClickException("another reconciliation is running (the 'reconcile' lease is held); try later")
    click.echo(summary.line())
    if summary.error or summary.failed:
        sys.exit(1)


@click.command("scheduler")
@with_appcontext
def scheduler_command() -> None:
    """Run the APScheduler loop in the foreground (reconciliation every RECONCILE_INTERVAL_SECONDS)."""
    from .scheduler import run_forever

    run_forever(current_runtime())


@click.command("backfill")
@with_appcontext
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


@click.group("voucher", cls=AppGroup)
def voucher_group() -> None:
    """Look at one voucher."""


@voucher_group.command("show")
@click.argument("code")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def voucher_show(code: str, as_json: bool) -> None:
    """Current state and full timeline of CODE, oldest event first."""
    from .ops import voucher_with_history

    with current_runtime().sessions() as session:
        found = voucher_with_history(session, code)
    if found is None:
        raise click.ClickException(f"no voucher with code {code!r} in this database")
    if as_json:
        click.echo(json.dumps(found, indent=2, ensure_ascii=False))
        return
    v = found["voucher"]
    click.echo(f"voucher {v['code']}: {v['status']}" + ("  (needs reconcile)" if v["needs_reconcile"] else "")
               + ("  (RM no longer knows it)" if v["rm_missing_at"] else ""))
    for name in ("label", "batch_key", "voucher_type", "amount", "expires_at", "redeemed_at", "used_at",
                 "rm_updated_at", "first_seen_at", "last_changed_at", "last_confirmed_at", "last_source"):
        if v[name] not in (None, ""):
            click.echo(f"  {name:<18} {v[name]}")
    click.echo("")
    click.echo(f"  {'#':>6}  {'recorded (UTC)':<26}  {'from':<10}  {'to':<12}  {'source':<9}  {'outcome':<14}  detail")
    for e in found["history"]:
        detail = e["detail"] or ""
        if e["delivery_id"]:
            detail = f"{detail} (delivery {e['delivery_id']})".strip()
        click.echo(
            f"  {e['id']:>6}  {e['recorded_at'][:26]:<26}  {e['from_status'] or '-':<10}  {e['to_status']:<12}  "
            f"{e['source']:<9}  {e['outcome']:<14}  {detail}"
        )


def _actions(actor: str | None):  # noqa: ANN202
    import getpass

    from .actions import MerchantActions

    return MerchantActions(current_runtime().sessions, _client(), actor=actor or f"cli:{getpass.getuser()}")


def _report(run) -> None:  # noqa: ANN001
    """Run an action, print its one-line result and the voucher it touched; exit 1 unless it succeeded."""
    from .actions import ActionInputError

    try:
        outcome = run()
    except ActionInputError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(outcome.line())
    item = outcome.item or {}
    if "status" in item:
        click.echo(f"voucher {item.get('code')}: {item.get('status')} (RM updatedAt {item.get('updatedAt')})")
    elif "noOfChoppedStamp" in item:
        click.echo(f"card {item.get('key')}: {item.get('noOfChoppedStamp')} stamps"
                   + (", completed" if item.get("isCompleted") else ""))
    if outcome.status != "succeeded":
        sys.exit(1)


_request_id = click.option("--request-id", help="Idempotency key: an action with this id runs at most once.")
_actor = click.option("--actor", help="Who is doing this (recorded); default cli:<login>.")


@voucher_group.command("redeem")
@click.argument("code")
@click.option("--country-code", required=True, help="Member's country calling code, digits (e.g. 60).")
@click.option("--phone", required=True, help="Member's phone number without the country code, digits.")
@_request_id
@_actor
def voucher_redeem(code: str, country_code: str, phone: str, request_id: str | None, actor: str | None) -> None:
    """Redeem CODE for a member through RM, and record it."""
    _report(lambda: _actions(actor).redeem(code, country_code=country_code, phone_number=phone, request_id=request_id))


@voucher_group.command("void")
@click.argument("code")
@click.option("--used-at", help="RFC 3339 time the voucher was used (default: now, at RM).")
@_request_id
@_actor
def voucher_void(code: str, used_at: str | None, request_id: str | None, actor: str | None) -> None:
    """Void (use) CODE through RM, and record it."""
    _report(lambda: _actions(actor).void(code, used_at=used_at, request_id=request_id))


@voucher_group.command("issue")
@click.argument("batch_key")
@_request_id
@_actor
def voucher_issue(batch_key: str, request_id: str | None, actor: str | None) -> None:
    """Issue the next voucher of BATCH_KEY through RM, and record it."""
    _report(lambda: _actions(actor).issue(batch_key, request_id=request_id))


@click.group("stamp", cls=AppGroup)
def stamp_group() -> None:
    """Loyalty chop stamps."""


@stamp_group.command("give")
@click.argument("card_code")
@_request_id
@_actor
def stamp_give(card_code: str, request_id: str | None, actor: str | None) -> None:
    """Give a chop stamp by the card's QR code '<card key>:<uuid>', and record it."""
    _report(lambda: _actions(actor).give_stamp(card_code, request_id=request_id))


@click.group("deliveries", cls=AppGroup)
def deliveries_group() -> None:
    """Look at, replay and purge stored callback deliveries."""


@deliveries_group.command("list")
@click.option("--outcome", "outcomes", multiple=True, help="accepted, duplicate, stale, rejected_signature, ...")
@click.option("--since", help="e.g. 30m, 2h, 7d, or an ISO time (UTC).")
@click.option("--limit", default=50, show_default=True)
def deliveries_list(outcomes: tuple[str, ...], since: str | None, limit: int) -> None:
    """Recent deliveries, newest first."""
    from .models import DeliveryOutcome
    from .ops import list_deliveries, parse_since

    known = {o.value for o in DeliveryOutcome}
    for outcome in outcomes:
        if outcome not in known:
            raise click.BadParameter(f"{outcome!r}; choose from {', '.join(sorted(known))}", param_hint="--outcome")
    try:
        since_at = parse_since(since) if since else None
    except ValueError:
        raise click.BadParameter(f"{since!r} is neither like 2h / 7d nor an ISO time", param_hint="--since") from None
    with current_runtime().sessions() as session:
        rows = list_deliveries(session, outcomes=outcomes, since=since_at, limit=limit)
    click.echo(f"{'id':>8}  {'received (UTC)':<26}  {'outcome':<18}  {'http':>4}  {'tries':>5}  {'voucher':<20}  error")
    for d in rows:
        click.echo(
            f"{d.id:>8}  {d.received_at.isoformat()[:26]:<26}  {d.outcome:<18}  {d.http_status:>4}  {d.attempts:>5}  "
            f"{(d.voucher_code or '-')[:20]:<20}  {(d.error or '')[:80]}"
        )
    click.echo(f"({len(rows)} shown)")


@deliveries_group.command("replay")
@click.option("--id", "ids", type=int, multiple=True, help="Replay this delivery (repeatable).")
@click.option("--failed", is_flag=True, help="Replay every verified delivery that failed on our side.")
def deliveries_replay(ids: tuple[int, ...], failed: bool) -> None:
    """Re-run stored deliveries through the apply path; one already applied is not applied again."""
    from .deliveries import NotReplayable, failed_delivery_ids, replay

    runtime = current_runtime()
    targets = list(dict.fromkeys(ids))
    if failed:
        with runtime.sessions() as session:
            targets += [i for i in failed_delivery_ids(session) if i not in targets]
    if not ids and not failed:
        raise click.UsageError("say which: --id ID (repeatable) and/or --failed")
    replayed, problems = 0, []
    with click.progressbar(targets, label="replaying", file=sys.stderr) as bar:
        for delivery_id in bar:
            try:
                with runtime.sessions.begin() as session:
                    result = replay(session, delivery_id)
            except (LookupError, NotReplayable) as exc:
                problems.append(str(exc))
                continue
            if result.apply is not None:
                replayed += 1
    for problem in problems:
        click.echo(f"skipped: {problem}", err=True)
    click.echo(f"replayed {replayed} of {len(targets)}" + (f" ({len(targets) - replayed} already applied or skipped)"
                                                          if replayed < len(targets) else ""))
    if problems:
        sys.exit(1)


@deliveries_group.command("purge")
@click.option("--older-than-days", type=int, help="Default: DELIVERY_RETENTION_DAYS.")
def deliveries_purge(older_than_days: int | None) -> None:
    """Drop stored bodies and headers of old deliveries (rows and voucher history stay)."""
    from .ops import purge_delivery_bodies

    runtime = current_runtime()
    days = older_than_days or runtime.settings.delivery_retention_days
    purged = purge_delivery_bodies(runtime.sessions, older_than_days=days)
    click.echo(f"purged bodies of {purged} deliveries older than {days} days")


@click.group("stamps", cls=AppGroup)
def stamps_group() -> None:
    """Stamps.co.id redemptions: run through Stamps and recorded in this database at once."""


def _stamps(actor: str | None, *, offline: bool = False):  # noqa: ANN202
    import getpass

    from .stamps_client import StampsNotConfigured
    from .stamps_ledger import StampsLedger, current_stamps_ledger

    who = actor or f"cli:{getpass.getuser()}"
    if offline:  # only the ledger is touched (resolve): no token needed
        return StampsLedger(current_runtime().sessions, None, actor=who)
    try:
        return current_stamps_ledger(who)
    except StampsNotConfigured as exc:
        raise click.ClickException(f"Stamps is not configured: {exc.message}") from None


def _stamps_report(run, ok: tuple[str, ...] = ("succeeded",)) -> None:  # noqa: ANN001
    """Run a Stamps operation, print its result, field errors and redemptions; exit 1 unless it ended ``ok``."""
    from .stamps_ledger import StampsConflict, StampsInputError

    try:
        outcome = run()
    except StampsConflict as exc:
        raise click.ClickException(str(exc)) from None
    except StampsInputError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(outcome.line())
    for name, message in outcome.errors.items():
        click.echo(f"  {name}: {message}")
    if outcome.pin_attempts_left is not None:
        click.echo(f"  PIN attempts left: {outcome.pin_attempts_left}")
    for r in outcome.redemptions:
        used = "" if r["stamps_used"] is None else f", {r['stamps_used']} stamps used"
        value = "" if r["value_deducted"] is None else f", {r['value_deducted']} deducted"
        after = "" if r["membership_stamps_after"] is None or r["status"] != "Created" else \
            f", member has {r['membership_stamps_after']} stamps"
        click.echo(f"redemption {r['stamps_id']} ({r['kind']}, store {r['store']}): {r['status']}{used}{value}{after}")
    customer = (outcome.response or {}).get("customer")
    if outcome.kind == "cancel" and isinstance(customer, dict) and customer.get("stamps_remaining") is not None:
        click.echo(f"member {customer.get('id')} has {customer['stamps_remaining']} stamps after the cancel")
    if outcome.status not in ok:
        sys.exit(1)


def _stamps_options(invoice_required: bool = False):  # noqa: ANN202
    """--user, --store, --invoice, --channel, --request-id, --actor."""

    def decorate(command):  # noqa: ANN001, ANN202
        for option in reversed((
            click.option("--user", required=True, help="Member: email, Member ID (or phone / id for authorize)."),
            click.option("--store", required=True, type=int, help="Stamps store id where the redemption happens."),
            click.option("--invoice", required=invoice_required,
                         help="POS invoice number: one store + invoice is never redeemed twice."),
            click.option("--channel", type=int, help="Stamps channel number of the transaction."),
            click.option("--request-id", help="Idempotency key, also sent to Stamps as request_id (the PIN-"
                                              "authorised one): redeems at most once."),
            _actor,
        )):
            command = option(command)
        return command

    return decorate


@stamps_group.command("redeem-reward")
@_stamps_options()
@click.option("--reward", required=True, type=int, help="Reward id.")
@click.option("--stamps", type=int, help="Stamps to use (flexible rewards).")
@click.option("--qty", type=int, help="Quantity.")
@click.option("--extra-data", help="JSON object stored with the redemption at Stamps.")
def stamps_redeem_reward(user: str, store: int, invoice: str | None, channel: int | None, request_id: str | None,
                         actor: str | None, reward: int, stamps: int | None, qty: int | None,
                         extra_data: str | None) -> None:
    """Redeem a reward for a member's stamps, and record it."""
    _stamps_report(lambda: _stamps(actor).redeem_reward(
        user=user, store=store, reward=reward, invoice_number=invoice, channel=channel, stamps=stamps, qty=qty,
        extra_data=extra_data, request_id=request_id,
    ))


@stamps_group.command("redeem-voucher")
@_stamps_options()
@click.option("--voucher", required=True, type=int, help="Voucher id.")
@click.option("--extra-data", help="JSON object stored with the redemption at Stamps.")
def stamps_redeem_voucher(user: str, store: int, invoice: str | None, channel: int | None, request_id: str | None,
                          actor: str | None, voucher: int, extra_data: str | None) -> None:
    """Redeem a member's voucher, and record it."""
    _stamps_report(lambda: _stamps(actor).redeem_voucher(
        user=user, store=store, voucher=voucher, invoice_number=invoice, channel=channel, extra_data=extra_data,
        request_id=request_id,
    ))


@stamps_group.command("deduct")
@_stamps_options()
@click.option("--voucher", required=True, type=int, help="Voucher id (a voucher with a dynamic value).")
@click.option("--value", required=True, type=int, help="Value to deduct (whole units).")
@click.option("--extra-data", help="JSON object stored with the redemption at Stamps.")
def stamps_deduct(user: str, store: int, invoice: str | None, channel: int | None, request_id: str | None,
                  actor: str | None, voucher: int, value: int, extra_data: str | None) -> None:
    """Deduct a value from a member's dynamic-value voucher, and record it."""
    _stamps_report(lambda: _stamps(actor).deduct(
        user=user, store=store, voucher=voucher, value=value, invoice_number=invoice, channel=channel,
        extra_data=extra_data, request_id=request_id,
    ))


@stamps_group.command("by-code")
@_stamps_options()
@click.option("--voucher-code", required=True, help="The voucher's code.")
@click.option("--voucher-template", required=True, type=int, help="The voucher template id.")
def stamps_by_code(user: str, store: int, invoice: str | None, channel: int | None, request_id: str | None,
                   actor: str | None, voucher_code: str, voucher_template: int) -> None:
    """Redeem a voucher by its code, and record it."""
    _stamps_report(lambda: _stamps(actor).redeem_by_code(
        user=user, store=store, voucher_code=voucher_code, voucher_template=voucher_template, invoice_number=invoice,
        channel=channel, request_id=request_id,
    ))


@stamps_group.command("promo")
@_stamps_options(invoice_required=True)
@click.option("--promo-code", required=True, help="The promo code.")
def stamps_promo(user: str, store: int, invoice: str, channel: int | None, request_id: str | None,
                 actor: str | None, promo_code: str) -> None:
    """Redeem a promo code on an invoice, and record it."""
    _stamps_report(lambda: _stamps(actor).redeem_promo(
        user=user, store=store, promo_code=promo_code, invoice_number=invoice, channel=channel, request_id=request_id,
    ))


def _parse_reward(spec: str) -> dict:
    """CODE[,qty=N][,stamps=N][,request_id=R]"""
    code, *rest = [part.strip() for part in spec.split(",")]
    item: dict = {"code": int(code) if code.isdigit() else code}
    for part in rest:
        name, sep, value = part.partition("=")
        if not sep or name not in ("qty", "stamps", "request_id"):
            raise click.BadParameter(f"{spec!r}: want CODE[,qty=N][,stamps=N][,request_id=R]", param_hint="--reward")
        item[name] = value if name == "request_id" else (int(value) if value.isdigit() else value)
    return item


@stamps_group.command("redeem-many")
@_stamps_options()
@click.option("--reward", "rewards", multiple=True, required=True,
              help="CODE[,qty=N][,stamps=N][,request_id=R] (repeatable).")
def stamps_redeem_many(user: str, store: int, invoice: str | None, channel: int | None, request_id: str | None,
                       actor: str | None, rewards: tuple[str, ...]) -> None:
    """Redeem several rewards in one call (Multiple Reward Redemption), and record them."""
    items = [_parse_reward(spec) for spec in rewards]
    _stamps_report(lambda: _stamps(actor).redeem_many(
        user=user, store=store, rewards=items, invoice_number=invoice, channel=channel, request_id=request_id,
    ))


@stamps_group.command("cancel")
@click.argument("redemption_id", type=int)
@click.option("--replacement-voucher", is_flag=True, help="Have Stamps create a replacement voucher.")
@_request_id
@_actor
def stamps_cancel(redemption_id: int, replacement_voucher: bool, request_id: str | None, actor: str | None) -> None:
    """Cancel Stamps redemption REDEMPTION_ID; the ledger row flips to Canceled (once)."""
    _stamps_report(lambda: _stamps(actor).cancel(
        redemption_id, create_replacement_voucher=replacement_voucher, request_id=request_id,
    ))


@stamps_group.command("authorize")
@click.option("--user", required=True, help="Member: email, Member ID, mobile number or id.")
@click.option("--request-id", required=True, help="The request id the redemption will carry.")
@click.option("--timeout", default=900, show_default=True, type=int, help="Seconds the authorisation is valid.")
@click.option("--pin", prompt="Member's PIN", hide_input=True, help="6 digits; prompted (hidden) when left out.")
@_actor
def stamps_authorize(user: str, request_id: str, timeout: int, pin: str, actor: str | None) -> None:
    """Authorise a redemption with the member's PIN (PIN authorisation mode); the PIN is never stored."""
    _stamps_report(lambda: _stamps(actor).authorize(user=user, pin=pin, request_id=request_id, timeout=timeout))


@stamps_group.command("resolve")
@click.argument("request_id")
@click.option("--redemption-id", "redemption_ids", type=int, multiple=True,
              help="Stamps shows this redemption for the operation (repeatable for redeem-many).")
@click.option("--not-done", is_flag=True, help="Stamps shows nothing: mark it failed and free its invoice.")
@_actor
def stamps_resolve(request_id: str, redemption_ids: tuple[int, ...], not_done: bool, actor: str | None) -> None:
    """Settle an ambiguous operation (its answer was lost) after checking the Stamps dashboard."""
    if bool(redemption_ids) == not_done:
        raise click.UsageError("say what Stamps shows: --redemption-id ID (repeatable) or --not-done")
    _stamps_report(lambda: _stamps(actor, offline=True).resolve(
        request_id, redemption_ids=list(redemption_ids), not_done=not_done,
    ), ok=("succeeded", "failed"))


def register(app: Flask) -> None:
    """Attach every ops command to the app's CLI."""
    for command in (
        reconcile_command, scheduler_command, backfill_command, voucher_group, deliveries_group, stamp_group,
        stamps_group,
    ):
        app.cli.add_command(command)
