"""A fake Stamps.co.id: a real HTTP server that behaves like Stamps' redemption API, for tests and the demo.

It checks ``Authorization: <token_type> <token>``, serves the eight redemption endpoints of the
seed (/work/shared/seeds/stamps-redemption-api.txt) with their documented response shapes, status
codes and error body ``{"detail", "errors", "error_code", "error_message"}``, keeps members'
stamps, vouchers, promo codes and redemptions, counts PIN attempts ("Invalid PIN, 2 attempt(s)
left"), and injects the same faults as the fake RM (``Faults``: latency, 5xx, fail_next, and
drop_after_apply + timeout_sleep for an answer lost after the change was made).

Where the seed is silent the fake decides, and says so here:
  * error codes other than ``invalid_pin``: ``invalid_data`` (missing or malformed fields),
    ``member_not_found``, ``store_not_found``, ``reward_not_found``, ``voucher_not_found``,
    ``voucher_already_used``, ``insufficient_stamps``, ``insufficient_value``,
    ``promo_code_not_found``, ``authorization_required``, ``pin_blocked``,
    ``redemption_already_canceled`` (all 400) and ``redemption_not_found`` (404);
  * a wrong or missing token is a 401 with only ``detail`` (Django REST framework's shape);
  * multiple reward redemption answers one documented ``redemption`` object for one reward and a
    list of them for several (one Stamps redemption per reward, each cancellable on its own);
  * canceling gives the stamps back, re-activates a redeemed voucher (or, with
    ``create_replacement_voucher``, issues a new one) and restores a deducted value.

Run it alone: ``python -m receiver.fake_stamps --port 9200`` (prints the STAMPS_* settings).
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from flask import Flask, Response, jsonify, request

from .fake_rm import Faults, LoggedRequest, run_until_interrupted, serve_in_thread, stop_serving

PIN_ATTEMPTS = 3
REQUIRED = "This field is required."
NOT_INTEGER = "A valid integer is required."


class Refusal(Exception):
    """A 4xx answer in Stamps' error shape."""

    def __init__(self, code: str, errors: dict[str, str] | None = None, *, status: int = 400,
                 detail: str | None = None) -> None:
        message = detail or "; ".join(f"{k}: {v}" for k, v in (errors or {}).items()) or code
        super().__init__(message)
        self.code, self.errors, self.status, self.message = code, errors or {}, status, message

    def response(self) -> tuple[Response, int]:
        body: dict[str, Any] = {"detail": self.message, "error_code": self.code, "error_message": self.message}
        if self.errors:
            body["errors"] = self.errors
        return jsonify(body), self.status


@dataclass
class Member:
    """A customer's membership at the merchant."""

    id: int
    email: str
    member_id: str
    name: str
    phone: str
    stamps: int
    pin: str
    pin_attempts_left: int = PIN_ATTEMPTS
    level: int = 100
    level_text: str = "Blue"

    def membership(self) -> dict[str, Any]:
        """The documented ``membership`` object (after a redemption)."""
        return {"tags": [], "status": self.level, "level": self.level, "level_text": self.level_text,
                "stamps": self.stamps, "balance": 0, "referral_code": f"R{self.id:06d}",
                "start_date": "2016-07-25", "created": "2016-07-25"}

    def customer(self) -> dict[str, Any]:
        """The documented ``customer`` object (by voucher code, cancel)."""
        return {"id": self.id, "status": self.level_text, "stamps_remaining": self.stamps}

    def user(self) -> dict[str, Any]:
        """The documented ``user`` object (promo code)."""
        return {"id": str(self.id), "name": self.name, "gender": "female", "address": "", "is_active": True,
                "email": self.email, "phone": self.phone, "picture_url": "", "birthday": "1990-01-01"}


@dataclass
class Redemption:
    """One redemption as Stamps keeps it."""

    id: int
    kind: str
    member_id: int
    store: int
    status: str
    stamps_used: int
    reward_name: str
    invoice_number: str | None = None
    channel: int | None = None
    request_id: str | None = None
    extra_data: dict[str, Any] = field(default_factory=dict)
    voucher_id: int | None = None
    value: int | None = None
    replacement_voucher_id: int | None = None


class FakeStamps:
    """State and behaviour of the fake; ``serve()`` puts it on a real HTTP port."""

    def __init__(self, *, token_type: str = "Token", token: str = "fake-stamps-token-7c1e", seed: int = 0) -> None:
        self.token_type = token_type
        self.token = token
        self.rng = random.Random(seed)
        self.lock = threading.RLock()
        self.members: dict[int, Member] = {}
        self.stores: set[int] = set()
        self.rewards: dict[int, dict[str, Any]] = {}
        self.vouchers: dict[int, dict[str, Any]] = {}
        self.promo_codes: dict[str, dict[str, Any]] = {}
        self.redemptions: dict[int, Redemption] = {}
        # request_id -> (member id, monotonic expiry) of PIN-authorised redemptions.
        self.authorizations: dict[str, tuple[int, float]] = {}
        # With PIN authorisation on, every redemption needs a request_id authorised for its member.
        self.pin_required = False
        self.faults = Faults()
        self.log: list[LoggedRequest] = []
        # The JSON bodies received, per endpoint, in order.
        self.received: dict[str, list[Any]] = {}
        self.base_url = ""
        self._ids = {"member": 400000, "voucher": 500, "redemption": 199000}
        self.app = self._build_app()
        self._server = None

    # -- state --------------------------------------------------------------------------------

    def _next(self, kind: str) -> int:
        with self.lock:
            self._ids[kind] += 1
            return self._ids[kind]

    def add_store(self, store: int) -> int:
        """A merchant store redemptions may name."""
        with self.lock:
            self.stores.add(store)
            return store

    def add_member(self, email: str, *, stamps: int = 500, pin: str = "123456", member_id: str | None = None,
                   phone: str | None = None) -> Member:
        """A member, found by email, Member ID, phone or primary key."""
        with self.lock:
            pk = self._next("member")
            member = Member(id=pk, email=email, member_id=member_id or f"M{pk}", name=email.split("@")[0].title(),
                            phone=phone or f"+62812{pk:07d}", stamps=stamps, pin=pin)
            self.members[pk] = member
            return member

    def add_reward(self, reward_id: int, name: str, *, stamps_to_redeem: int, code: str | None = None,
                   flexible: bool = False, voucher: bool = False) -> dict[str, Any]:
        """A reward; ``flexible`` ones need ``stamps``; ``voucher`` ones issue a voucher when redeemed."""
        with self.lock:
            reward = {"id": reward_id, "name": name, "stamps_to_redeem": stamps_to_redeem, "extra_data": {},
                      "code": code or f"MI{reward_id:04d}", "type": "voucher" if voucher else "reward",
                      "flexible": flexible}
            self.rewards[reward_id] = reward
            return reward

    def add_voucher(self, owner: Member, name: str, *, code: str | None = None, template: int | None = None,
                    value: int | None = None) -> dict[str, Any]:
        """A voucher held by ``owner``; ``value`` makes it a dynamic-value voucher (deduct-value)."""
        with self.lock:
            vid = self._next("voucher")
            voucher = {"id": vid, "name": name, "code": code or f"VC{vid:06d}", "template": template or 12,
                       "owner": owner.id, "is_active": True, "value": value, "type": "voucher",
                       "start_date": "2016-07-25", "end_date": "2099-12-31"}
            self.vouchers[vid] = voucher
            return dict(voucher)

    def add_promo_code(self, code: str, name: str) -> dict[str, Any]:
        """A promo code anyone may redeem once per invoice."""
        with self.lock:
            promo = {"code": code, "name": name, "is_active": True}
            self.promo_codes[code] = promo
            return promo

    def member(self, identifier: Any) -> Member | None:
        """By email, Member ID, phone or primary key (as Stamps' ``user`` parameter)."""
        text = str(identifier)
        with self.lock:
            for m in self.members.values():
                if text in (m.email, m.member_id, m.phone, str(m.id)):
                    return m
        return None

    def requests_for(self, endpoint: str) -> list[LoggedRequest]:
        """Logged API requests of one kind."""
        with self.lock:
            return [r for r in self.log if r.endpoint == endpoint]

    # -- request checks ---------------------------------------------------------------------

    @staticmethod
    def _fields(body: dict[str, Any], required: tuple[str, ...], integers: tuple[str, ...] = ()) -> None:
        errors: dict[str, str] = {}
        for name in required:
            if body.get(name) in (None, ""):
                errors[name] = REQUIRED
        for name in integers:
            value = body.get(name)
            if name not in errors and value is not None and (isinstance(value, bool) or not _is_int(value)):
                errors[name] = NOT_INTEGER
        if errors:
            raise Refusal("invalid_data", errors)

    def _member_and_store(self, body: dict[str, Any], user_field: str = "user") -> Member:
        member = self.member(body.get(user_field))
        if member is None:
            raise Refusal("member_not_found", {user_field: f"Member {body.get(user_field)} not found"})
        if int(body["store"]) not in self.stores:
            raise Refusal("store_not_found", {"store": f"Store {body['store']} not found"})
        return member

    def _check_authorised(self, member: Member, request_id: Any, field_name: str = "request_id") -> None:
        if not self.pin_required:
            return
        granted = self.authorizations.get(str(request_id)) if request_id else None
        if granted is None or granted[0] != member.id or granted[1] < time.monotonic():
            raise Refusal("authorization_required", {field_name: "Redemption has not been authorized with the PIN"})

    def _consume(self, request_id: Any) -> None:
        if self.pin_required and request_id:
            self.authorizations.pop(str(request_id), None)

    def _redeem(self, kind: str, member: Member, body: dict[str, Any], *, stamps_used: int, reward_name: str,
                voucher_id: int | None = None, value: int | None = None,
                request_id: Any = None) -> Redemption:
        member.stamps -= stamps_used
        redemption = Redemption(
            id=self._next("redemption"), kind=kind, member_id=member.id, store=int(body["store"]), status="Created",
            stamps_used=stamps_used, reward_name=reward_name, invoice_number=body.get("invoice_number"),
            channel=body.get("channel"), request_id=request_id if request_id is not None else body.get("request_id"),
            extra_data=body.get("extra_data") or {}, voucher_id=voucher_id, value=value,
        )
        self.redemptions[redemption.id] = redemption
        return redemption

    def _voucher_of(self, member: Member, voucher_id: Any) -> dict[str, Any]:
        voucher = self.vouchers.get(int(voucher_id))
        if voucher is None or voucher["owner"] != member.id:
            raise Refusal("voucher_not_found", {"voucher": f"Voucher {voucher_id} not found for this member"})
        if not voucher["is_active"]:
            raise Refusal("voucher_already_used", {"voucher": "Voucher has already been used"})
        return voucher

    @staticmethod
    def _public_voucher(voucher: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in voucher.items() if k not in ("owner", "template")}

    # -- endpoints --------------------------------------------------------------------------

    def redeem_reward(self, body: dict[str, Any]) -> dict[str, Any]:
        self._fields(body, ("user", "reward", "store"), ("reward", "store", "stamps", "qty", "channel"))
        member = self._member_and_store(body)
        reward = self.rewards.get(int(body["reward"]))
        if reward is None:
            raise Refusal("reward_not_found", {"reward": f"Reward {body['reward']} not found"})
        qty = int(body.get("qty") or 1)
        if reward["flexible"]:
            if body.get("stamps") is None:
                raise Refusal("invalid_data", {"stamps": "This field is required for a flexible reward."})
            needed = int(body["stamps"])
        else:
            needed = reward["stamps_to_redeem"] * qty
        if needed > member.stamps:
            raise Refusal("insufficient_stamps", {"stamps": _short(member.stamps, needed)})
        self._check_authorised(member, body.get("request_id"))
        issued = None
        if reward["type"] == "voucher":
            issued = self.add_voucher(member, f"Free {reward['name']}")
        redemption = self._redeem("redeem_reward", member, body, stamps_used=needed, reward_name=reward["name"])
        self._consume(body.get("request_id"))
        answer = {
            "redemption": {"id": redemption.id, "reward": reward["name"], "stamps_used": needed,
                           "extra_data": redemption.extra_data},
            "membership": member.membership(),
            "reward": {k: v for k, v in reward.items() if k != "flexible"},
        }
        if issued is not None:
            answer["voucher"] = self._public_voucher(issued)
        return answer

    def redeem_voucher(self, body: dict[str, Any], *, deduct: bool = False) -> dict[str, Any]:
        required = ("user", "voucher", "store", "value") if deduct else ("user", "voucher", "store")
        self._fields(body, required, ("voucher", "store", "channel", "value"))
        member = self._member_and_store(body)
        voucher = self._voucher_of(member, body["voucher"])
        value = None
        if deduct:
            value = int(body["value"])
            if voucher["value"] is None:
                raise Refusal("invalid_data", {"voucher": "This voucher has no dynamic value"})
            if value <= 0 or value > voucher["value"]:
                raise Refusal("insufficient_value", {"value": f"Value must be between 1 and {voucher['value']}"})
        self._check_authorised(member, body.get("request_id"))
        if deduct:
            voucher["value"] -= value
            voucher["is_active"] = voucher["value"] > 0
        else:
            voucher["is_active"] = False
        kind = "deduct_value" if deduct else "redeem_voucher"
        redemption = self._redeem(kind, member, body, stamps_used=0, reward_name=voucher["name"],
                                  voucher_id=voucher["id"], value=value)
        self._consume(body.get("request_id"))
        return {
            "redemption": {"id": redemption.id, "reward": voucher["name"], "stamps_used": 0,
                           "extra_data": redemption.extra_data},
            "membership": member.membership(),
            "voucher": {"id": voucher["id"], "name": voucher["name"], "code": voucher["code"], "type": "voucher"},
        }

    def by_voucher_code(self, body: dict[str, Any]) -> dict[str, Any]:
        user_field = "identifier" if body.get("identifier") not in (None, "") else "user"
        self._fields(body, (user_field, "voucher_code", "voucher_template", "store"), ("voucher_template", "store"))
        member = self._member_and_store(body, user_field)
        voucher = next((v for v in self.vouchers.values() if v["code"] == body["voucher_code"]
                        and v["template"] == int(body["voucher_template"]) and v["owner"] == member.id), None)
        if voucher is None:
            raise Refusal("voucher_not_found", {"voucher_code": f"Voucher {body['voucher_code']} not found"})
        if not voucher["is_active"]:
            raise Refusal("voucher_already_used", {"voucher_code": "Voucher has already been used"})
        self._check_authorised(member, body.get("request_id"))
        voucher["is_active"] = False
        redemption = self._redeem("by_voucher_code", member, body, stamps_used=0, reward_name=voucher["name"],
                                  voucher_id=voucher["id"])
        self._consume(body.get("request_id"))
        return {"redemption": {"id": redemption.id, "status": "Created"}, "customer": member.customer()}

    def promo_code(self, body: dict[str, Any]) -> dict[str, Any]:
        self._fields(body, ("user", "promo_code", "store", "invoice_number"), ("store", "channel"))
        member = self._member_and_store(body)
        promo = self.promo_codes.get(str(body["promo_code"]))
        if promo is None or not promo["is_active"]:
            raise Refusal("promo_code_not_found", {"promo_code": f"Promo code {body['promo_code']} is not valid"})
        self._check_authorised(member, body.get("request_id"))
        redemption = self._redeem("promo_code", member, body, stamps_used=0, reward_name=promo["name"])
        self._consume(body.get("request_id"))
        return {
            "redemption": {"id": redemption.id, "reward": promo["name"], "stamps_used": 0, "extra_data": {}},
            "user": member.user(),
            "membership": member.membership(),
        }

    def cancel(self, body: dict[str, Any]) -> dict[str, Any]:
        self._fields(body, ("id",), ("id",))
        redemption = self.redemptions.get(int(body["id"]))
        if redemption is None:
            raise Refusal("redemption_not_found", status=404, detail=f"Cannot find redemption {body['id']}")
        if redemption.status == "Canceled":
            raise Refusal("redemption_already_canceled", {"id": "Redemption is already canceled"})
        member = self.members[redemption.member_id]
        member.stamps += redemption.stamps_used
        voucher = self.vouchers.get(redemption.voucher_id) if redemption.voucher_id else None
        if voucher is not None:
            if redemption.value is not None:
                voucher["value"] += redemption.value
                voucher["is_active"] = True
            elif body.get("create_replacement_voucher"):
                replacement = self.add_voucher(member, voucher["name"], template=voucher["template"])
                redemption.replacement_voucher_id = replacement["id"]
            else:
                voucher["is_active"] = True
        redemption.status = "Canceled"
        return {"redemption": {"id": redemption.id, "status": "Canceled"}, "customer": member.customer()}

    def authorize(self, body: dict[str, Any]) -> dict[str, Any]:
        self._fields(body, ("user", "pin", "request_id", "timeout"), ("timeout",))
        member = self.member(body["user"])
        if member is None:
            raise Refusal("member_not_found", {"user": f"Member {body['user']} not found"})
        if member.pin_attempts_left <= 0:
            raise Refusal("pin_blocked", {"pin": "PIN is blocked: too many invalid attempts"})
        if str(body["pin"]) != member.pin:
            member.pin_attempts_left -= 1
            raise Refusal("invalid_pin", {"pin": f"Invalid PIN, {member.pin_attempts_left} attempt(s) left"})
        member.pin_attempts_left = PIN_ATTEMPTS
        self.authorizations[str(body["request_id"])] = (member.id, time.monotonic() + int(body["timeout"]))
        return {"status": "ok"}

    def redeem_many(self, body: dict[str, Any]) -> dict[str, Any]:
        self._fields(body, ("user", "rewards", "store"), ("store", "channel"))
        member = self._member_and_store(body)
        rewards = body["rewards"]
        if not isinstance(rewards, list) or not rewards:
            raise Refusal("invalid_data", {"rewards": "A non-empty list of rewards is required."})
        plan = []
        for i, item in enumerate(rewards):
            if not isinstance(item, dict) or item.get("code") in (None, ""):
                raise Refusal("invalid_data", {f"rewards[{i}].code": REQUIRED})
            reward = next((r for r in self.rewards.values() if str(item["code"]) in (str(r["id"]), r["code"])), None)
            if reward is None:
                raise Refusal("reward_not_found", {f"rewards[{i}].code": f"Reward {item['code']} not found"})
            if reward["flexible"] and item.get("stamps") is None:
                raise Refusal("invalid_data", {f"rewards[{i}].stamps": "This field is required for a flexible reward."})
            qty = int(item.get("qty") or 1)
            needed = int(item["stamps"]) if reward["flexible"] else reward["stamps_to_redeem"] * qty
            self._check_authorised(member, item.get("request_id"), f"rewards[{i}].request_id")
            plan.append((reward, needed, item.get("request_id")))
        total = sum(needed for _r, needed, _rid in plan)
        if total > member.stamps:
            raise Refusal("insufficient_stamps", {"stamps": _short(member.stamps, total)})
        made = []
        for reward, needed, rid in plan:
            issued = self.add_voucher(member, f"Free {reward['name']}") if reward["type"] == "voucher" else None
            redemption = self._redeem("redeem_many", member, body, stamps_used=needed, reward_name=reward["name"],
                                      request_id=rid)
            self._consume(rid)
            entry = {"id": redemption.id, "reward": {k: v for k, v in reward.items() if k != "flexible"},
                     "stamps_used": needed, "extra_data": {}}
            if issued is not None:
                entry["voucher"] = self._public_voucher(issued)
            made.append(entry)
        return {"redemption": made[0] if len(made) == 1 else made, "membership": member.membership()}

    # -- HTTP ---------------------------------------------------------------------------------

    def _check_auth(self) -> tuple[Response, int] | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return jsonify({"detail": "Authentication credentials were not provided."}), 401
        if header != f"{self.token_type} {self.token}":
            return jsonify({"detail": "Invalid token."}), 401
        return None

    def _inject_faults(self) -> tuple[Response, int] | None:
        f = self.faults
        with self.lock:
            forced = f.fail_next > 0
            if forced:
                f.fail_next -= 1
        status = f.fail_status if forced else None
        if not forced:
            if f.latency:
                time.sleep(f.latency)
            roll = self.rng.random()
            if roll < f.rate_5xx:
                status = self.rng.choice([500, 502, 503])
            elif roll < f.rate_5xx + f.rate_timeout:
                time.sleep(f.timeout_sleep)
                status = 504
        if status is None:
            return None
        if status in (502, 504):
            # What a proxy in front of Stamps answers: not JSON.
            return Response(f"<html><body><h1>{status}</h1></body></html>", status=status, mimetype="text/html")
        return jsonify({"detail": "A server error occurred.", "error_code": "server_error",
                        "error_message": "A server error occurred."}), status

    def _build_app(self) -> Flask:
        app = Flask("fake_stamps")
        fake = self

        @app.after_request
        def _log(response: Response) -> Response:
            entry = request.environ.get("fake_stamps.entry")
            if entry is not None:
                entry.status, entry.finished = response.status_code, time.monotonic()
            return response

        def endpoint(path: str, name: str, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
            def view() -> Any:
                body = request.get_json(silent=True)
                key = None
                if isinstance(body, dict):
                    key = str(body.get("invoice_number") or body.get("id") or body.get("request_id") or "") or None
                entry = LoggedRequest(request.method, request.path, name, key, 0, time.monotonic(), 0.0)
                request.environ["fake_stamps.entry"] = entry
                with fake.lock:
                    fake.log.append(entry)
                    fake.received.setdefault(name, []).append(body)
                refused = fake._check_auth() or fake._inject_faults()
                if refused:
                    return refused
                if not isinstance(body, dict):
                    return Refusal("invalid_data", detail="JSON parse error: send a JSON object").response()
                try:
                    with fake.lock:
                        answer = handler(body)
                except Refusal as refusal:
                    return refusal.response()
                return fake._answer(answer)

            app.add_url_rule(path, name, view, methods=["POST"])

        endpoint("/api/v2/redemptions/redeem-reward", "redeem_reward", fake.redeem_reward)
        endpoint("/api/v2/redemptions/redeem-voucher", "redeem_voucher", fake.redeem_voucher)
        endpoint("/api/vouchers/deduct-value", "deduct_value", lambda b: fake.redeem_voucher(b, deduct=True))
        endpoint("/api/redemptions/by-voucher-code", "by_voucher_code", fake.by_voucher_code)
        endpoint("/api/v3/redemptions/redeem-promo-code", "promo_code", fake.promo_code)
        endpoint("/api/redemptions/cancel", "cancel", fake.cancel)
        endpoint("/api/redemptions/authorize", "authorize", fake.authorize)
        endpoint("/api/v2/redemptions/redeem-multiple-rewards", "redeem_many", fake.redeem_many)

        @app.errorhandler(405)
        def _method(_error) -> tuple[Response, int]:  # noqa: ANN001
            return jsonify({"detail": f'Method "{request.method}" not allowed.'}), 405

        @app.errorhandler(404)
        def _missing(_error) -> tuple[Response, int]:  # noqa: ANN001
            return jsonify({"detail": "Not found."}), 404

        return app

    def _answer(self, payload: dict[str, Any]) -> Any:
        """Answer a state change, unless told to lose the answer after making it."""
        with self.lock:
            lose = self.faults.drop_after_apply > 0
            if lose:
                self.faults.drop_after_apply -= 1
        if lose:
            # The change is made; the answer arrives only after the client has given up waiting.
            time.sleep(self.faults.timeout_sleep)
        return Response(json.dumps(payload), mimetype="application/json")

    # -- serving ------------------------------------------------------------------------------

    def serve(self, host: str = "127.0.0.1", port: int = 0, threads: int = 16) -> str:
        """Start serving in a background thread (waitress, keep-alive); return the base URL."""
        self._server, self.base_url = serve_in_thread(self.app, host, port, threads, "fake-stamps")
        return self.base_url

    def shutdown(self) -> None:
        """Stop serving."""
        if self._server is not None:
            stop_serving(self._server)
            self._server = None


def _short(have: int, need: int) -> str:
    return f"Insufficient stamps: {have} left, {need} needed"


def _is_int(value: Any) -> bool:
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def demo_fake(**kwargs: Any) -> FakeStamps:
    """A fake with a store (32), a member (customer@stamps.co.id, PIN 123456), rewards, vouchers and a promo code."""
    fake = FakeStamps(**kwargs)
    fake.add_store(32)
    member = fake.add_member("customer@stamps.co.id", stamps=250)
    fake.add_reward(1, "Kaya Bun", stamps_to_redeem=2, code="MI0017")
    fake.add_reward(2, "Free Coffee", stamps_to_redeem=10, voucher=True)
    fake.add_reward(3, "Flexible Discount", stamps_to_redeem=0, flexible=True)
    fake.add_voucher(member, "Discount Rp 100,000", code="PZ633ECV")
    fake.add_voucher(member, "Gift card", code="GIFT0001", value=100000)
    fake.add_promo_code("PROMOCODE", "Discount 10%")
    return fake


def main(argv: list[str] | None = None) -> None:
    """Run the fake Stamps on its own (demo), with a little data."""
    parser = argparse.ArgumentParser(prog="python -m receiver.fake_stamps")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--pin-required", action="store_true", help="redemptions need a PIN-authorised request_id")
    args = parser.parse_args(argv)
    fake = demo_fake()
    fake.pin_required = args.pin_required
    base = fake.serve(args.host, args.port)
    print(f"fake Stamps listening on {base}", flush=True)
    print(f"  STAMPS_API_BASE_URL={base} STAMPS_TOKEN_TYPE={fake.token_type} STAMPS_TOKEN={fake.token}", flush=True)
    for v in fake.vouchers.values():
        print(f"  voucher {v['id']} {v['code']} ({v['name']})", flush=True)
    run_until_interrupted(fake.shutdown)


if __name__ == "__main__":
    main()
