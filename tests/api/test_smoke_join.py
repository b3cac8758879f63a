from __future__ import annotations

from tests.conftest import Installed, create_token, join


def test_host_joins_with_token_and_is_recorded(client, installed: Installed) -> None:
    token = create_token(client, installed)["token"]
    response = join(client, token, "10.0.0.2", zone="ece-zone-2")
    assert response.status_code == 200, response.text
    assert response.json()["roles"] == ["allocator"]
    with installed.platform.store.read() as tx:
        assert tx.find_allocator("10.0.0.2") is not None
