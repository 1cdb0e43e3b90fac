"""The Flask application factory."""

from __future__ import annotations

import logging
import sys

from flask import Flask, Response, jsonify

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
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = Flask(__name__)
    app.extensions[EXTENSION_KEY] = Runtime.from_settings(settings)
    if settings.insecure_skip_signature:
        app.logger.warning("RM_INSECURE_SKIP_SIGNATURE=1: callbacks are NOT verified; never run this in production")

    from . import cli, health, webhook

    app.register_blueprint(webhook.bp)
    app.register_blueprint(health.bp)
    cli.register(app)

    @app.errorhandler(404)
    def _not_found(_error) -> tuple[Response, int]:  # noqa: ANN001
        return jsonify({"error": "not_found"}), 404

    @app.errorhandler(405)
    def _method_not_allowed(_error) -> tuple[Response, int]:  # noqa: ANN001
        return jsonify({"error": "method_not_allowed"}), 405

    return app
