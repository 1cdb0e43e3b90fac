"""The Flask application factory."""

from __future__ import annotations

import sys
import time

from flask import Flask, Response, g, jsonify, request

from . import logs
from .metrics import REQUEST_SECONDS, labelled
from .config import ConfigError, Settings, load_dotenv_if_present, load_settings
from .runtime import EXTENSION_KEY, Runtime


def create_app(settings: Settings | None = None) -> Flask:
    """Build the web app; settings default to the environment (and `.env`), validated now."""
    if settings is None:
        load_dotenv_if_present()
        try:
            settings = load_settings()
        except ConfigError as exc:
            # One clear line, not a traceback: this is what an operator sees at start-up.
            sys.stderr.write(f"configuration error: {exc}\n")
            raise SystemExit(2) from None
    logs.configure(settings.log_level, settings.log_format, settings.secret_values())
    app = Flask(__name__)
    app.extensions[EXTENSION_KEY] = Runtime.from_settings(settings)
    if settings.insecure_skip_signature:
        app.logger.warning("RM_INSECURE_SKIP_SIGNATURE=1: callbacks are NOT verified; never run this in production")

    from . import cli, health, ops_api, webhook

    app.register_blueprint(webhook.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(ops_api.bp)
    cli.register(app)

    @app.before_request
    def _start_request() -> None:
        g.request_id = logs.new_request_id(request.headers.get("X-Request-Id"))
        g.started = time.perf_counter()

    @app.after_request
    def _finish_request(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        labelled(REQUEST_SECONDS, endpoint, request.method).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(404)
    def _not_found(_error) -> tuple[Response, int]:  # noqa: ANN001
        return jsonify({"error": "not_found"}), 404

    @app.errorhandler(405)
    def _method_not_allowed(_error) -> tuple[Response, int]:  # noqa: ANN001
        return jsonify({"error": "method_not_allowed"}), 405

    return app
