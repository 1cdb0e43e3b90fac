"""rm-voucher-sync: RevenueMonster voucher callbacks mirrored into SQL, exactly."""

from .app import create_app

__all__ = ["create_app"]
