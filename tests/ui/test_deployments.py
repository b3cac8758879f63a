"""The Cloud UI's Deployments page in headless Chromium against a real coordinator process: a
deployment created from the form is listed with its instances, and its page shows them with
their allocators and the plan's activity."""

from __future__ import annotations

import re

import pytest

from tests.conftest import Coordinator
from tests.ui.conftest import Console, sync_api

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
expect = sync_api.expect
FIRST_HOST = "127.0.0.1"


def test_a_deployment_created_from_the_form_is_listed_with_its_instances(
    console: Console, ui_coordinator: Coordinator
) -> None:
    page = console.login()
    page.get_by_role("link", name="Deployments").click()
    page.wait_for_url("**/ui/deployments")
    page.get_by_label("Name").fill("ui-web")
    page.get_by_label("Container image").fill("registry.example/web:1")
    page.get_by_label("Memory per instance (MB)").fill("256")
    page.get_by_label("Environment").fill("MODE=ui")
    page.get_by_role("button", name="Create deployment").click()

    row = page.locator("#deployments tr", has=page.get_by_role("link", name="ui-web"))
    expect(row).to_have_count(1)
    expect(row.locator(".deployment-instances")).to_have_text(re.compile(r"^\d of 1 running$"))
    expect(row.locator(".deployment-allocators")).to_have_text(FIRST_HOST)
    expect(row.locator(".deployment-memory")).to_have_text("0.25 GB")

    row.get_by_role("link", name="ui-web").click()
    page.wait_for_url(re.compile(r"/ui/deployments/[0-9a-f]{32}$"))
    deployment_id = page.url.rsplit("/", 1)[1]
    try:
        instance = page.locator("#instances-table tbody tr")
        expect(instance).to_have_count(1)
        expect(instance).to_contain_text("instance-0000000000")
        expect(instance.get_by_role("link", name=FIRST_HOST)).to_be_visible()
        expect(page.locator("#plans")).to_contain_text("allocate-instances")

        # The API agrees with what the page shows.
        doc = ui_coordinator.api("GET", f"/api/v1/deployments/{deployment_id}").json()
        [resource] = doc["resources"]["container"]
        assert resource["info"]["topology"]["instances"][0]["allocator_id"] == FIRST_HOST
        assert resource["info"]["plan_info"]["pending"]["plan"]["container"]["env"] == {
            "MODE": "ui"
        }
    finally:
        path = f"/api/v1/deployments/{deployment_id}"
        assert ui_coordinator.api("POST", f"{path}/_shutdown").status_code == 200
        assert ui_coordinator.api("DELETE", path).status_code == 200
