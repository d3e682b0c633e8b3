"""A managed-mode gateway with an admin key, and users with keys issued through it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.gateway_process import GatewayProcess

ADMIN_KEY = "admin-test-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass(frozen=True)
class Member:
    user_id: str
    key: str
    key_id: str


@contextmanager
def managed_gateway(
    upstream: Any, history_dsn: str, workdir: Path, **extra: str
) -> Iterator[GatewayProcess]:
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "UPSTREAM_API_KEY": "sk-upstream-secret",
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "SQL_DSN": history_dsn,
        **extra,
    }
    with GatewayProcess(env, workdir) as gateway:
        yield gateway


def new_member(gateway: GatewayProcess, name: str) -> Member:
    with httpx.Client(base_url=gateway.url, headers=ADMIN) as admin:
        user = admin.post("/admin/users", json={"name": name})
        assert user.status_code == 201, user.text
        user_id = user.json()["id"]
        key = admin.post(f"/admin/users/{user_id}/keys", json={"name": f"{name}'s key"})
        assert key.status_code == 201, key.text
        return Member(user_id, key.json()["key"], key.json()["id"])
