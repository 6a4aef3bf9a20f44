"""The status page at ``GET /``, driven by a real headless Chromium (Python playwright, Debian's
/usr/bin/chromium) against a real uvicorn server, a real worker and real terraform (the local
runner), all in this event loop.

The browser tests skip when Chromium or playwright is missing (they fail instead when
TFDEPLOY_REQUIRE_BROWSER is set: tests/conftest.py). Screenshots go to artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.api.app import create_app
from service.auth import create_token
from service.services import Services, open_services
from service.settings import from_env
from service.worker import Worker

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

# Sleeps, then prints a marker -- and some markup, which must reach the page as text.
SLOW_THEN_MARKER = """
variable "name" { default = "web" }
resource "terraform_data" "web" {
  input = var.name
  provisioner "local-exec" {
    command = "sleep 1.5; echo 'MARKER-${self.input} <img src=x id=injected>'"
  }
}
"""

QUICK = """
resource "terraform_data" "quick" {
  provisioner "local-exec" { command = "echo QUICK-MARKER" }
}
"""

ALWAYS_FAILS = """
resource "terraform_data" "bad" {
  provisioner "local-exec" { command = "echo failing now; exit 3" }
}
"""

# Records every status each deploy's badge shows in the list, from the first paint on: the
# page is never reloaded, so this is the whole history the user saw.
RECORD_BADGES = """
window.__badgeHistory = {};
window.__loadCount = (window.__loadCount || 0) + 1;
new MutationObserver(() => {
  for (const row of document.querySelectorAll('.deploy-row[data-deploy-id]')) {
    const badge = row.querySelector('.badge');
    if (!badge) continue;
    const id = row.dataset.deployId;
    const seen = (window.__badgeHistory[id] = window.__badgeHistory[id] || []);
    const status = badge.dataset.status;
    if (seen[seen.length - 1] !== status) seen.push(status);
  }
}).observe(document, { subtree: true, childList: true, attributes: true, characterData: true });
"""


def browser_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed"
    if importlib.util.find_spec("playwright") is None:
        return "python playwright is not installed"
    return None


# ---------------------------------------------------------------- a live server


@dataclass
class Live:
    url: str
    token: str
    admin_token: str
    services: Services


@contextlib.asynccontextmanager
async def live_server(database_url: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[Live]:
    """uvicorn on 127.0.0.1 (a free port) serving create_app(services), and a worker with the
    local runner, in this event loop."""
    values: dict[str, Any] = dict(
        data_dir=str(tmp_path / "data"), runner="local", retry_delay=0.05, max_concurrency=2
    )
    values.update(overrides)
    services = await open_services(from_env({}, **values), database_url)
    worker = Worker(services, name="browser-test-worker")
    worker_task = asyncio.create_task(worker.run())
    async with services.pool.connection() as conn:
        token = await create_token(conn, "ann")
        admin_token = await create_token(conn, "root", admin=True)
    config = uvicorn.Config(
        create_app(services),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    server_task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if server_task.done():
                server_task.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Live(f"http://127.0.0.1:{port}", token, admin_token, services)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server_task, 15)
        worker.stop()
        await asyncio.wait_for(worker_task, 60)
        await worker.close()
        await services.close()


# ---------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        # launch() gives every run a fresh temporary profile (user-data dir).
        instance = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield instance
        finally:
            await instance.close()


@contextlib.asynccontextmanager
async def open_page(
    browser: Any,
    live: Live,
    *,
    token: str | None = None,
    width: int = 1280,
    refuse_streams: bool = False,
):
    context = await browser.new_context(viewport={"width": width, "height": 900})
    await context.add_init_script(RECORD_BADGES)
    if refuse_streams:  # as a server (or a proxy) without the SSE routes would
        await context.route(
            re.compile(r"/stream(\?|$)"),
            lambda route: route.fulfill(
                status=404,
                content_type="application/json",
                body='{"status_code":404,"detail":"Not Found"}',
            ),
        )
    page = await context.new_page()
    page.set_default_timeout(20_000)
    page.requests = []  # type: ignore[attr-defined]
    page.errors = []  # type: ignore[attr-defined]
    page.on("request", lambda r: page.requests.append(r.url))  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
    try:
        await page.goto(live.url + "/")
        await page.fill("#token-input", token or live.token)
        await page.click("#token-form button[type=submit]")
        yield page
    finally:
        await context.close()


async def submit(
    page: Any,
    config: str,
    *,
    workspace: str,
    variables: str = "",
    attempts: str = "",
    action: str = "apply",
    auto_approve: bool = True,
) -> str:
    """Fills the form, submits it, and returns the new deploy's id (from the list row)."""
    before = set(
        await page.eval_on_selector_all(".deploy-row", "rs => rs.map(r => r.dataset.deployId)")
    )
    await page.fill("#f-workspace", workspace)
    await page.locator("#f-files .file-content").first.fill(config)
    await page.fill("#f-variables", variables)
    await page.fill("#f-attempts", attempts)
    await page.select_option("#f-action", action)
    if action != "plan":
        await page.set_checked("#f-auto-approve", auto_approve)
    await page.click("#f-submit")
    await page.wait_for_function(
        "n => document.querySelectorAll('.deploy-row').length > n", arg=len(before)
    )
    ids = await page.eval_on_selector_all(".deploy-row", "rs => rs.map(r => r.dataset.deployId)")
    (new_id,) = [i for i in ids if i not in before]
    return new_id


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


# ---------------------------------------------------------------- tests


@pytest.mark.browser
async def test_page_follows_a_deploy_live_until_it_succeeds(browser, database_url, tmp_path):
    from playwright.async_api import expect

    async with live_server(database_url, tmp_path) as live, open_page(browser, live) as page:
        await expect(page.locator("#list-empty")).to_be_visible()
        deploy_id = await submit(page, SLOW_THEN_MARKER, workspace="site", variables="name=web-1")
        row_badge = page.locator(f'.deploy-row[data-deploy-id="{deploy_id}"] .badge')
        detail_badge = page.locator("#d-badge .badge")

        # Submitted: selected at once, waiting or already running.
        await expect(row_badge).to_have_attribute("data-status", re.compile("^(queued|deploying)$"))
        await expect(page.locator("#detail")).to_be_visible()
        await expect(detail_badge).to_contain_text(re.compile("대기중|배포중"))
        await expect(detail_badge).to_contain_text("배포 완료", timeout=60_000)
        await expect(row_badge).to_have_attribute("data-status", "succeeded")
        await expect(row_badge).to_contain_text("배포 완료")
        await expect(row_badge).to_contain_text("succeeded")
        await expect(page.locator("#d-log")).to_contain_text("MARKER-web-1")
        await expect(page.locator("#d-mode")).to_have_attribute("data-mode", "ended")

        # The timeline, from the stream.
        types = await page.eval_on_selector_all(
            "#d-timeline > li", "ls => ls.map(l => l.dataset.type)"
        )
        assert types == ["Requested", "Started", "StatePersisted", "Succeeded"]
        await expect(page.locator('#d-timeline li[data-type="Requested"]')).to_contain_text(
            "variables: name"
        )
        await expect(page.locator('#d-timeline li[data-type="Started"]')).to_contain_text(
            "attempt 1"
        )

        # Without a reload, the badge went from waiting/running to done...
        history = await page.evaluate(f"window.__badgeHistory[{deploy_id!r}]")
        assert history[0] in ("queued", "deploying"), history
        assert history[-1] == "succeeded", history
        assert "deploying" in history, history
        assert await page.evaluate("window.__loadCount") == 1
        # ... and it followed the live stream (EventSource), not the polling fallback.
        probe = await page.evaluate("window.tfdeploy")
        assert probe["streamOpens"] >= 1, probe
        assert probe["sseEvents"] >= 4 and probe["sseLogLines"] >= 1, probe
        assert probe["logPolls"] == 0 and probe["eventPolls"] == 0, probe
        assert any(f"/deploys/{deploy_id}/stream?access_token=" in u for u in page.requests)
        assert not any("/logs" in u for u in page.requests)

        # Terraform's output is shown as text, never as markup.
        await expect(page.locator("#d-log")).to_contain_text("<img src=x id=injected>")
        assert await page.locator("#injected").count() == 0
        # A non-admin learns it is not one (403 from the admin feed): no replay button anywhere.
        assert probe["globalMode"] == "not-admin", probe
        assert page.errors == []

        await page.screenshot(path=str(screenshot_path("status-page.png")), full_page=True)

        # The token stays in the browser: a reload shows the deploy again with no typing.
        await page.goto(live.url + f"/#/deploys/{deploy_id}")
        await page.reload()
        await expect(page.locator("#d-badge .badge")).to_contain_text("배포 완료")
        await expect(page.locator("#d-log")).to_contain_text("MARKER-web-1")


@pytest.mark.browser
async def test_page_shows_a_failed_deploy_and_an_admin_replays_it(browser, database_url, tmp_path):
    from playwright.async_api import expect

    # max_attempts 2: a replay grants two attempts afresh.
    async with live_server(database_url, tmp_path, max_attempts=2) as live:
        async with open_page(browser, live) as page:
            deploy_id = await submit(page, ALWAYS_FAILS, workspace="broken", attempts="1")
            detail_badge = page.locator("#d-badge .badge")
            await expect(detail_badge).to_contain_text("배포 실패", timeout=60_000)
            await expect(detail_badge).to_contain_text("failed")
            row = page.locator(f'.deploy-row[data-deploy-id="{deploy_id}"]')
            await expect(row.locator(".badge")).to_have_attribute("data-status", "failed")
            await expect(row).to_contain_text("attempt 1/1")
            await expect(page.locator("#list-empty")).to_be_hidden()
            await expect(page.locator("#d-error")).to_contain_text("apply_failed")
            failed = page.locator('#d-timeline li[data-type="Failed"]')
            await expect(failed).to_contain_text("reason: apply_failed")
            await expect(failed).to_contain_text("exit code 1")  # terraform's own exit code
            await expect(failed).to_contain_text("exit status 3")  # the provisioner's
            await expect(failed).to_contain_text("final")
            await expect(page.locator("#d-log")).to_contain_text("failing now")
            await expect(page.locator("#d-cancel")).to_be_hidden()
            await expect(page.locator("#d-replay")).to_be_hidden()  # not an admin
            assert page.errors == []
            await page.screenshot(
                path=str(screenshot_path("status-page-failed.png")), full_page=True
            )

        # An admin sees everyone's deploys, and the replay button.
        async with open_page(browser, live, token=live.admin_token) as page:
            await page.click(f'.deploy-row[data-deploy-id="{deploy_id}"]')
            await expect(page.locator("#d-badge .badge")).to_contain_text("배포 실패")
            await expect(page.locator("#d-mode")).to_have_attribute("data-mode", "ended")
            replay = page.locator("#d-replay")
            await expect(replay).to_be_visible()
            await replay.click()
            # Runs again (attempts 2 and 3 of 3), fails again; the page follows it live.
            await expect(page.locator('#d-timeline li[data-type="Retried"]').first).to_contain_text(
                "by admin"
            )
            await expect(page.locator('#d-timeline li[data-type="Failed"]')).to_have_count(
                3, timeout=60_000
            )
            await expect(page.locator("#d-badge .badge")).to_contain_text("배포 실패")
            await expect(
                page.locator(f'.deploy-row[data-deploy-id="{deploy_id}"]')
            ).to_contain_text("attempt 3/3")
            history = await page.evaluate(f"window.__badgeHistory[{deploy_id!r}]")
            assert history[0] == "failed" and history[-1] == "failed", history
            assert "retrying" in history, history
            probe = await page.evaluate("window.tfdeploy")
            assert probe["globalMode"] == "live", probe  # the admin's list follows every event
            assert probe["logPolls"] == 0, probe
            assert page.errors == []


@pytest.mark.browser
async def test_page_sends_files_and_secrets_and_cancels_a_running_deploy(
    browser, database_url, tmp_path
):
    from playwright.async_api import expect

    main_tf = """
resource "terraform_data" "first" {
  provisioner "local-exec" { command = "echo MADE-FIRST with ${var.token}" }
}
resource "terraform_data" "slow" {
  depends_on = [terraform_data.first]
  provisioner "local-exec" { command = "sleep 30" }
}
"""
    secret = "Sup3rSecretValue-77"
    async with live_server(database_url, tmp_path) as live, open_page(browser, live) as page:
        await page.fill("#f-workspace", "cancelme")
        await page.locator("#f-files .file-content").first.fill(main_tf)
        # A second file, loaded from disk through the file picker.
        await page.set_input_files(
            "#f-pick",
            files=[
                {
                    "name": "variables.tf",
                    "mimeType": "text/plain",
                    "buffer": b'variable "token" {}\n',
                }
            ],
        )
        await expect(page.locator("#f-files .file-row")).to_have_count(2)
        await page.click("#f-add-secret")
        await page.locator("#f-secrets .secret-name").fill("token")
        await page.locator("#f-secrets .secret-value").fill(secret)
        assert await page.locator("#f-secrets .secret-value").get_attribute("type") == "password"
        await page.click("#f-submit")

        log = page.locator("#d-log")
        await expect(log).to_contain_text("MADE-FIRST with ***", timeout=30_000)  # masked
        await expect(page.locator('#d-timeline li[data-type="Requested"]')).to_contain_text(
            "files: main.tf, variables.tf"
        )
        await expect(page.locator('#d-timeline li[data-type="Requested"]')).to_contain_text(
            "secrets: token"
        )
        assert await page.locator("#f-secrets .secret-value").input_value() == ""  # not kept
        cancel = page.locator("#d-cancel")
        await expect(cancel).to_be_visible()
        await cancel.click()
        await expect(cancel).to_have_text("Confirm cancel")  # two clicks: no accidental cancel
        await cancel.click()
        await expect(page.locator("#d-badge .badge")).to_contain_text("취소됨", timeout=40_000)
        await expect(page.locator("#d-badge .badge")).to_contain_text("cancelled")
        await expect(cancel).to_be_hidden()
        types = await page.eval_on_selector_all(
            "#d-timeline > li", "ls => ls.map(l => l.dataset.type)"
        )
        assert types[-3:] == ["CancelRequested", "StatePersisted", "Cancelled"], types
        assert secret not in await page.content()
        assert page.errors == []


@pytest.mark.browser
async def test_page_falls_back_to_polling_without_streams(browser, database_url, tmp_path):
    """A server (or proxy) that refuses the SSE routes: the page still follows the deploy."""
    from playwright.async_api import expect

    async with (
        live_server(database_url, tmp_path) as live,
        open_page(browser, live, width=390, refuse_streams=True) as page,
    ):
        deploy_id = await submit(page, QUICK, workspace="polled")
        await expect(page.locator("#d-badge .badge")).to_contain_text("배포 완료", timeout=60_000)
        await expect(page.locator("#d-log")).to_contain_text("QUICK-MARKER")
        await expect(
            page.locator(f'.deploy-row[data-deploy-id="{deploy_id}"] .badge')
        ).to_contain_text("배포 완료")
        types = await page.eval_on_selector_all(
            "#d-timeline > li", "ls => ls.map(l => l.dataset.type)"
        )
        assert types == ["Requested", "Started", "StatePersisted", "Succeeded"]
        probe = await page.evaluate("window.tfdeploy")
        assert probe["streamOpens"] == 0 and probe["logPolls"] >= 1, probe
        assert page.errors == []
        await page.screenshot(path=str(screenshot_path("status-page-narrow.png")), full_page=True)


async def test_static_files_are_served_from_an_allow_list(database_url, tmp_path):
    services = await open_services(
        from_env({}, data_dir=str(tmp_path / "data"), runner="local"), database_url
    )
    try:
        transport = httpx.ASGITransport(app=create_app(services))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            index = await client.get("/")  # no token needed for the page itself
            assert index.status_code == 200
            assert index.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in index.headers["content-security-policy"]
            assert index.headers["referrer-policy"] == "no-referrer"
            assert '<script src="/static/app.js"' in index.text
            for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
                r = await client.get(f"/static/{name}")
                assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
                assert r.headers["x-content-type-options"] == "nosniff"
            for bad in (
                "/static/nope.js",
                "/static/..%2Fapi%2Fweb.py",
                "/static/%2E%2E%2Fweb.py",
                "/static/index.htm",
                "/static/",
            ):
                r = await client.get(bad)
                assert r.status_code == 404, bad
            assert "/static/{name}" not in (await client.get("/schema/openapi.json")).text
    finally:
        await services.close()


# ---------------------------------------------------------------- plans, approval, outputs

TWO_AND_OUTPUTS = """
variable "name" { default = "web" }
resource "terraform_data" "web" {
  input = var.name
  provisioner "local-exec" { command = "sleep 1; echo APPLIED-${self.input}" }
}
resource "terraform_data" "db" {
  input = "db-${var.name}"
}
output "url" { value = "https://${var.name}.example" }
output "password" {
  value     = "pw-${var.name}-Secr3t"
  sensitive = true
}
"""

REPLACEABLE = """
variable "generation" { default = "1" }
resource "terraform_data" "box" {
  triggers_replace = var.generation
}
resource "terraform_data" "fresh" {
  count = var.generation == "1" ? 0 : 1
}
"""


async def plan_rows(page: Any) -> list[tuple[str, str, str]]:
    rows = await page.eval_on_selector_all(
        "#d-plan-changes > li",
        "ls => ls.map(l => [l.dataset.address, l.dataset.action, l.querySelector('.pc-sym').textContent])",
    )
    return [tuple(r) for r in rows]


@pytest.mark.browser
async def test_page_shows_a_plan_approves_it_and_follows_the_apply(browser, database_url, tmp_path):
    from playwright.async_api import expect

    async with live_server(database_url, tmp_path) as live, open_page(browser, live) as page:
        await page.select_option("#f-action", "apply")
        await page.set_checked("#f-auto-approve", False)
        await expect(page.locator("#f-submit")).to_have_text("Plan for review")
        deploy_id = await submit(
            page, TWO_AND_OUTPUTS, workspace="shop", variables="name=zebra", auto_approve=False
        )
        badge = page.locator("#d-badge .badge")
        await expect(badge).to_have_attribute("data-status", "planned", timeout=60_000)
        await expect(badge).to_contain_text("승인 대기")
        await expect(badge).to_contain_text("planned")
        # The plan: each resource with terraform's symbol, the counts, the buttons.
        await expect(page.locator("#d-plan")).to_be_visible()
        await expect(page.locator("#d-plan-changes > li")).to_have_count(2)
        assert sorted(await plan_rows(page)) == [
            ("terraform_data.db", "create", "+"),
            ("terraform_data.web", "create", "+"),
        ]
        await expect(page.locator("#d-plan-summary")).to_contain_text("+2 to add")
        await expect(page.locator("#d-plan-summary")).to_contain_text("-0 to destroy")
        await expect(page.locator("#d-plan-note")).to_contain_text("승인 대기")
        create_colour = await page.eval_on_selector(
            '#d-plan-changes li[data-action="create"] .pc-sym', "e => getComputedStyle(e).color"
        )
        assert create_colour == "rgb(21, 128, 61)", create_colour  # terraform's green
        approve = page.locator("#d-approve")
        await expect(approve).to_be_visible()
        await expect(page.locator("#d-discard")).to_be_visible()
        await expect(page.locator('#d-timeline li[data-type="Planned"]')).to_contain_text(
            "waits for approval"
        )
        assert "APPLIED-zebra" not in await page.locator("#d-log").inner_text()
        await page.screenshot(path=str(screenshot_path("status-page-plan.png")), full_page=True)

        await approve.click()
        await expect(badge).to_contain_text("배포 완료", timeout=60_000)
        await expect(page.locator("#d-plan-actions")).to_be_hidden()
        await expect(page.locator("#d-plan-note")).to_contain_text("Applied")
        await expect(page.locator("#d-log")).to_contain_text("APPLIED-zebra")
        types = await page.eval_on_selector_all(
            "#d-timeline > li", "ls => ls.map(l => l.dataset.type)"
        )
        assert types == [
            "Requested", "Started", "Planned", "Approved", "Started", "StatePersisted", "Succeeded",
        ], types
        await expect(page.locator('#d-timeline li[data-type="Approved"]')).to_contain_text(
            "by user:ann"
        )
        # The workspace's outputs (the sensitive one as such, never its value) and resources.
        await expect(page.locator("#d-workspace")).to_be_visible()
        url_row = page.locator('#d-outputs tr[data-output="url"]')
        await expect(url_row).to_contain_text("https://zebra.example")
        secret_row = page.locator('#d-outputs tr[data-output="password"]')
        await expect(secret_row).to_contain_text("(sensitive · 민감)")
        assert await secret_row.get_attribute("data-sensitive") == "true"
        assert "Secr3t" not in await page.content()
        await expect(page.locator("#d-resources > li")).to_have_count(2)
        await expect(page.locator("#d-resources")).to_contain_text("terraform_data.web")

        # Without a reload: the badge went planned -> queued/deploying -> succeeded.
        history = await page.evaluate(f"window.__badgeHistory[{deploy_id!r}]")
        assert history[-1] == "succeeded" and "planned" in history, history
        assert history.index("planned") < len(history) - 1
        assert await page.evaluate("window.__loadCount") == 1
        probe = await page.evaluate("window.tfdeploy")
        assert probe["streamOpens"] >= 1 and probe["logPolls"] == 0, probe
        assert page.errors == []
        await page.screenshot(path=str(screenshot_path("status-page-applied.png")), full_page=True)


@pytest.mark.browser
async def test_page_discards_a_plan_and_shows_buttons_only_to_who_may_act(
    browser, database_url, tmp_path
):
    from playwright.async_api import expect

    from service import workspaces

    async with live_server(database_url, tmp_path) as live:
        async with open_page(browser, live) as page:
            deploy_id = await submit(page, QUICK, workspace="review", auto_approve=False)
            badge = page.locator("#d-badge .badge")
            await expect(badge).to_have_attribute("data-status", "planned", timeout=60_000)
            await expect(page.locator("#d-approve")).to_be_visible()

        # A read member sees the plan, not the buttons; a deploy member sees both.
        async with live.services.pool.connection() as conn:
            rita = await create_token(conn, "rita")
            dave = await create_token(conn, "dave")
            ws = await workspaces.find(conn, "ann", "review")
        assert ws is not None
        await workspaces.set_member(live.services.pool, ws, "rita", "read", "user:ann")
        await workspaces.set_member(live.services.pool, ws, "dave", "deploy", "user:ann")
        for token, may in ((rita, False), (dave, True)):
            async with open_page(browser, live, token=token) as page:
                await page.goto(live.url + f"/#/deploys/{deploy_id}")
                await expect(page.locator("#d-badge .badge")).to_contain_text("승인 대기")
                await expect(page.locator("#d-plan-changes > li")).to_have_count(1)
                await page.wait_for_function("() => window.tfdeploy.planRenders >= 1")
                await asyncio.sleep(0.5)  # the role is asked for after the plan arrived
                assert await page.locator("#d-approve").is_visible() == may
                assert page.errors == []

        async with open_page(browser, live) as page:
            await page.goto(live.url + f"/#/deploys/{deploy_id}")
            discard = page.locator("#d-discard")
            await expect(discard).to_be_visible()
            await discard.click()
            badge = page.locator("#d-badge .badge")
            await expect(badge).to_contain_text("폐기됨")
            await expect(badge).to_have_attribute("data-status", "discarded")
            await expect(page.locator("#d-plan-actions")).to_be_hidden()
            await expect(page.locator("#d-plan-note")).to_contain_text("Discarded")
            await expect(page.locator('#d-timeline li[data-type="Discarded"]')).to_contain_text(
                "by user:ann"
            )
            await expect(page.locator("#d-mode")).to_have_attribute("data-mode", "ended")
            await expect(page.locator("#d-workspace")).to_be_hidden()
            assert "QUICK-MARKER" not in await page.locator("#d-log").inner_text()
            assert page.errors == []


@pytest.mark.browser
async def test_page_shows_a_speculative_plan_with_a_replace(browser, database_url, tmp_path):
    from playwright.async_api import expect

    async with live_server(database_url, tmp_path) as live, open_page(browser, live) as page:
        first = await submit(page, REPLACEABLE, workspace="boxes")
        await expect(page.locator("#d-badge .badge")).to_contain_text("배포 완료", timeout=60_000)
        await expect(page.locator("#d-workspace")).to_be_visible()
        await expect(page.locator("#d-outputs-empty")).to_be_visible()
        plan_id = await submit(
            page, REPLACEABLE, workspace="boxes", variables="generation=2", action="plan"
        )
        assert plan_id != first
        badge = page.locator("#d-badge .badge")
        await expect(badge).to_contain_text("계획 완료", timeout=60_000)
        await expect(badge).to_have_attribute("data-status", "succeeded")
        await expect(page.locator("#d-plan-changes > li")).to_have_count(2)
        assert sorted(await plan_rows(page)) == [
            ("terraform_data.box", "replace", "-/+"),
            ("terraform_data.fresh[0]", "create", "+"),
        ]
        colours = await page.eval_on_selector_all(
            '#d-plan-changes li[data-action="replace"] .pc-sym > span',
            "ss => ss.map(s => getComputedStyle(s).color)",
        )
        assert colours == ["rgb(185, 28, 28)", "rgb(161, 98, 7)", "rgb(21, 128, 61)"], colours
        await expect(page.locator("#d-plan-summary")).to_contain_text("+2 to add")
        await expect(page.locator("#d-plan-summary")).to_contain_text("-1 to destroy")
        await expect(page.locator("#d-plan-note")).to_contain_text("speculative")
        await expect(page.locator("#d-plan-actions")).to_be_hidden()
        await expect(page.locator("#d-workspace")).to_be_hidden()  # a plan changes no state
        assert page.errors == []
        await page.screenshot(path=str(screenshot_path("status-page-speculative.png")), full_page=True)
