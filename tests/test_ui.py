"""The web page (/ui/) in a real browser: Debian's chromium, driven by Playwright.

A gateway on the simulator serves real traffic first (yesterday and today, on a fixed clock);
then the page is signed in as a client and as the admin, and every figure it shows is checked
against the admin API. The admin disables the key that would serve next, from the page, and the
next request avoids it. Every request the page made, its source, its storage and its DOM are
searched for the keys. The README's screenshots are taken here, from that data: set
UPDATE_SCREENSHOTS=1 to write them to docs/screenshots/ (otherwise they go to tmp_path only).

Without chromium the browser tests skip, locally; in CI (CI set) they fail instead, since
.ci/run installs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from openai import AsyncOpenAI
from prometheus_client import CollectorRegistry

from router.app import create_app
from router.config import load_settings
from router.demo import running
from router.quota.memory_store import MemoryStore
from router.simulator import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    Simulator,
    SimulatorConfig,
)
from router.status import amount
from router.ui import ASSETS, CSP
from tests.conftest import MODEL, GatewayClock
from tests.support import CLIENT_KEY, recorded
from tests.test_usage_visible import (
    BOTS_KEY,
    serving,
    settings_with_money,
    usage_of_two_days,
)

try:
    from playwright.async_api import (
        Browser,
        BrowserContext,
        Page,
        Request,
        Response,
        async_playwright,
        expect,
    )
    from playwright.async_api import Error as PlaywrightError
except ImportError:  # pragma: no cover - the dev extras install it
    async_playwright = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

TEAM_KEY = "sk-test-ui-team-5f1c"
BOT_KEY = "sk-test-ui-bot-93ad"
ADMIN_KEY = "sk-test-ui-admin-c0de"
KEYS = [("alice", "ms-ui-alice-1", 3), ("bob", "ms-ui-bob-2", 4)]
KEYS += [("carol", "ms-ui-carol-3", 4), ("dave", "ms-ui-dave-4", 4)]
BAILIAN_SECRET = "sk-ui-bailian-5"
MODEL_LIMIT = 100
R1 = "deepseek-ai/DeepSeek-R1-0528"
OTHER = "moonshotai/Kimi-K2-Instruct"
SECRETS = [TEAM_KEY, BOT_KEY, ADMIN_KEY, BAILIAN_SECRET, *(s for _, s, _ in KEYS)]
SECRETS.append(hashlib.sha256(ADMIN_KEY.encode()).hexdigest())
pytestmark = pytest.mark.timeout(120)  # a browser on a busy 2-core machine
TIMEOUT_MS = 10_000  # every wait on the page is bounded by this (the page refreshes every 5 s)
if async_playwright is not None:
    expect.set_options(timeout=TIMEOUT_MS)

# -- the gateway and its traffic ----------------------------------------------------------------


def simulator_config() -> SimulatorConfig:
    return SimulatorConfig(
        modelscope=ModelScopeConfig(
            tokens=[
                ModelScopeToken(
                    secret=s,
                    name=n,
                    daily_limit=lim,
                    model_daily_limit=MODEL_LIMIT,
                    model_limits={R1: 2},
                )
                for n, s, lim in KEYS
            ]
        ),
        bailian=BailianConfig(keys=[BailianKey(secret=BAILIAN_SECRET, name="main", daily_limit=5)]),
    )


def gateway_config(sim: Simulator, root_path: str = "") -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "root_path": root_path},
        "store": {"url": "memory://"},
        "providers": [
            {
                "name": "modelscope",
                "type": "modelscope",
                "base_url": sim.modelscope_url,
                "strategy": "fill_first",
                "model_daily_limit": MODEL_LIMIT,
                "model_limits": {R1: 2},
                "keys": [{"name": n, "secret": s, "daily_limit": lim} for n, s, lim in KEYS],
            },
            {
                "name": "bailian",
                "type": "bailian",
                "base_url": sim.bailian_url,
                "daily_limit": 5,
                "keys": [{"name": "main", "secret": BAILIAN_SECRET}],
            },
        ],
        "models": [
            {
                "id": "qwen3-32b",
                "routes": [
                    {"provider": "modelscope", "model": MODEL},
                    {"provider": "bailian", "model": "qwen3-32b"},
                ],
            }
        ],
        "clients": [
            {"name": "team", "key": TEAM_KEY, "daily_limit": 40, "share": 2},
            {"name": "ci-bot", "key": BOT_KEY, "models": ["Qwen/*"], "fallback": False},
        ],
        "fair_share": {"below": 0.8},
        "admin": {"key": ADMIN_KEY},
    }


@dataclass
class Team:
    """A gateway (started from a config file, so the page's reload works) on the simulator."""

    url: str
    sim: Simulator
    config_path: Path
    config: dict[str, Any]
    clock: GatewayClock
    served: list[tuple[str, str]] = field(default_factory=list)

    async def ask(self, key: str = TEAM_KEY, model: str = MODEL, base_url: str = "") -> str:
        """One chat call; the key's name that served it."""
        client = AsyncOpenAI(base_url=base_url or f"{self.url}/v1", api_key=key, max_retries=0)
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
        finally:
            await client.close()
        served = (raw.headers["x-router-provider"], raw.headers["x-router-key"])
        self.served.append(served)
        return served[1]

    async def admin(self, path: str) -> Any:
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r,
        ):
            assert r.status == 200
            return await r.json()

    def used(self, key: str) -> int:
        count: int = self.sim.state.stats("modelscope")["by_token"][key]["used"]
        return count


@asynccontextmanager
async def team_gateway(
    tmp_path: Path, clock: GatewayClock, root_path: str = "", traffic: bool = True
) -> AsyncIterator[Team]:
    async with Simulator(simulator_config(), clock=clock.seconds) as sim:
        config = gateway_config(sim, root_path)
        path = tmp_path / "router.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        app = create_app(
            load_settings(path, env={}),
            clock=clock,
            registry=CollectorRegistry(),
            config_path=path,
        )
        async with running(app) as url:
            team = Team(url, sim, path, config, clock)
            if traffic:
                await serve_traffic(team)
                await recorded(app)  # its usage in the store: the page and the API agree
            yield team


async def serve_traffic(team: Team) -> None:
    """Yesterday two calls; today alice runs out, bob fails once and cools down, carol serves."""
    clock = team.clock
    clock.now = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)  # 14:00 in Shanghai, the day before
    assert [await team.ask() for _ in range(2)] == ["alice", "alice"]
    clock.now = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)
    team.sim.faults.add("status_503", token="bob", count=1)  # bob cools down (the clock stands)
    assert [await team.ask() for _ in range(3)] == ["alice", "alice", "alice"]
    assert await team.ask(model=OTHER) == "carol"  # a model no alias names, no limit of its own
    assert await team.ask(BOT_KEY) == "carol"


# -- the browser ------------------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None or CHROMIUM is None:
        reason = (
            "the browser tests need Debian's chromium and the playwright package "
            "(apt-get install chromium; pip install playwright): .ci/run installs both"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    async with async_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Recorder:
    """Everything a browser context sent and received, and the CSP violations it saw."""

    requests: list[Request] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    bodies: list[tuple[Response, bytes]] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    read: asyncio.Event = field(default_factory=asyncio.Event)

    def attach(self, context: BrowserContext) -> None:
        context.on("request", lambda request: self.requests.append(request))
        context.on("response", self._on_response)
        context.on("console", lambda message: self.console.append(message.text))

    async def _on_response(self, response: Response) -> None:
        # read at once: a body is gone once the page navigates away
        self.responses.append(response)
        try:
            body = await response.body()
        except PlaywrightError:  # a redirect has none
            body = b""
        self.bodies.append((response, body))
        if len(self.bodies) == len(self.responses):
            self.read.set()

    async def all_bodies(self) -> list[tuple[Response, bytes]]:
        if len(self.bodies) < len(self.responses):
            self.read.clear()
            await asyncio.wait_for(self.read.wait(), 5)
        return self.bodies


async def new_page(
    browser: Browser, recorder: Recorder, **options: Any
) -> tuple[BrowserContext, Page]:
    context = await browser.new_context(**options)
    recorder.attach(context)
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return context, page


async def sign_in(page: Page, page_url: str, key: str, view: str) -> None:
    await page.goto(page_url)
    await page.get_by_label("Your client key, or the admin key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator(f"body[data-view={view}]")).to_have_count(1)


async def snap(page: Page, name: str, tmp_path: Path, *, full_page: bool = True) -> None:
    """A screenshot into tmp_path; into docs/screenshots/ too with UPDATE_SCREENSHOTS=1."""
    target = tmp_path / name
    await page.screenshot(path=str(target), full_page=full_page)
    assert target.stat().st_size > 5_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, SCREENSHOTS / name)


async def table(page: Page, table_id: str) -> list[dict[str, str]]:
    """A table's rows: each cell's text by its data-field, and the row's data attributes (as
    "@id", "@state", ...)."""
    rows: list[dict[str, str]] = await page.evaluate(
        """(id) => Array.from(document.getElementById(id).tBodies[0].rows, (row) => ({
            ...Object.fromEntries(Array.from(row.cells, (c) => [c.dataset.field, c.textContent])),
            ...Object.fromEntries(Object.entries(row.dataset).map(([k, v]) => ["@" + k, v])),
        }))""",
        table_id,
    )
    return rows


def shown(value: int | None) -> str:
    return "no cap" if value is None else str(value)


def model_left(provider: dict[str, Any], model: str, cap: int | None) -> int:
    """The test's own sum, from /admin/quota: what the usable keys can still serve of a model
    (``cap``: a key's limit for a model it has not served today)."""
    total = 0
    for key in provider["keys"]:
        if key["state"] not in ("available", "cooling"):
            continue
        entry = next((m for m in key["models"] if m["model"] == model), None)
        if entry is None:
            total += key["remaining"] if cap is None else min(key["remaining"], cap)
        elif entry["state"] in ("available", "cooling"):
            total += min(key["remaining"], entry["remaining"])
    return total


async def audit(context: BrowserContext, page: Page, recorder: Recorder, signed_in: str) -> None:
    """No key in any URL, request body, answer, cookie, local storage or the page itself; the
    signed-in key only in sessionStorage and in the Authorization header of API calls."""
    assert recorder.requests
    others = [s for s in SECRETS if s != signed_in]
    for request in recorder.requests:
        text = request.url + (request.post_data or "")
        for secret in SECRETS:
            assert secret not in text, request.url
        headers = await request.all_headers()
        authorization = headers.get("authorization")
        is_api = "/api/" in request.url or "/admin/" in request.url
        if is_api:
            assert authorization == f"Bearer {signed_in}", request.url
        else:
            assert authorization is None, request.url
        for name, value in headers.items():
            if name != "authorization":
                assert all(s not in value for s in SECRETS), name
            assert all(s not in value for s in others), name
        assert "cookie" not in headers
    for response, raw in await recorder.all_bodies():
        headers = await response.all_headers()
        assert "set-cookie" not in headers
        body = raw.decode("utf-8", "replace")
        for secret in SECRETS:
            assert secret not in body, response.url
            assert all(secret not in v for v in headers.values()), response.url
    state = await page.evaluate(
        """() => ({
            html: document.documentElement.outerHTML,
            text: document.body.innerText,
            href: location.href,
            title: document.title,
            inputs: Array.from(document.querySelectorAll("input"), (i) => i.value),
            local: JSON.stringify(localStorage),
            session: JSON.stringify(sessionStorage),
            cookie: document.cookie,
        })"""
    )
    for name in ("html", "text", "href", "title", "local", "cookie"):
        for secret in SECRETS:
            assert secret not in state[name], name
    assert all(secret not in value for value in state["inputs"] for secret in SECRETS)
    assert state["local"] == "{}"
    assert state["cookie"] == ""
    assert await context.cookies() == []
    assert state["session"] == '{"modelscope-router.key":"' + signed_in + '"}'
    for url in {r.url for r in recorder.requests if r.resource_type in ("document", "script")}:
        async with aiohttp.ClientSession() as http, http.get(url) as source:
            text = await source.text()
        assert all(secret not in text for secret in SECRETS), url
    assert not [line for line in recorder.console if "Content Security Policy" in line]


# -- the tests --------------------------------------------------------------------------------


async def test_member_view_shows_the_api_figures_and_refreshes_live(
    browser: Browser, gateway_clock: GatewayClock, tmp_path: Path
) -> None:
    async with team_gateway(tmp_path, gateway_clock) as team:
        recorder = Recorder()
        context, page = await new_page(browser, recorder, viewport={"width": 1100, "height": 420})
        await page.goto(team.url + "/ui/")
        await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        await snap(page, "ui-signin.png", tmp_path, full_page=False)
        await page.set_viewport_size({"width": 1100, "height": 900})
        await sign_in(page, team.url + "/ui/", TEAM_KEY, "member")
        await expect(page.locator("#who")).to_have_text("Signed in as client team")

        quota = await team.admin("/admin/quota")
        clients = await team.admin("/admin/clients")
        await check_pool(page, quota, team.config)
        zone = quota["timezone"]
        await expect(page.locator("#day")).to_have_text(
            f"Quota day {quota['day']} ({zone}). The pool resets at 2026-11-30 00:00 {zone}, "
            "in 10h 00m."
        )
        reset_in = str(quota["next_reset"]["in_seconds"])
        await expect(page.locator("#day")).to_have_attribute("data-reset-in", reset_in)
        me = next(c for c in clients["clients"] if c["name"] == "team")
        # today: 4 calls, one of them sent to bob too (his 503 counts, as upstream calls do)
        assert (me["today"]["used"], me["yesterday"]["used"]) == (5, 2)
        await check_usage(page, me, clients)
        assert me["today"]["fair_share"], "the pool went below 80%: shared out"
        await expect(page.locator('#limits [data-field="daily_limit"]')).to_have_text("40 calls")
        await expect(page.locator('#limits [data-field="fallback"]')).to_have_text("allowed")
        await expect(page.locator("#base-url")).to_have_text(team.url + "/v1")
        await expect(page.locator("#api-host")).to_have_text(team.url)
        await expect(page.locator("#root-path-warning")).to_be_hidden()
        listed = await v1_models(team.url, TEAM_KEY)
        assert listed[0] == "qwen3-32b"
        assert await page.locator("#models code").all_text_contents() == listed
        assert await page.locator("#keys, #clients, #config").evaluate_all(
            "(sections) => sections.every((s) => s.hidden)"
        )

        # live: a call made elsewhere shows up without touching the page
        before = quota["providers"][0]["remaining"]
        assert await team.ask() == "carol"
        modelscope = page.locator('#pool-table tr[data-id="modelscope|"] [data-field="remaining"]')
        await expect(modelscope).to_have_text(str(before - 1))
        today = page.locator('#mine-table tr[data-id="today"] [data-field="used"]')
        await expect(today).to_have_text("6")
        await check_pool(page, await team.admin("/admin/quota"), team.config)
        await snap(page, "ui-member.png", tmp_path)
        await audit(context, page, recorder, TEAM_KEY)

        # the key is this tab's: a reload keeps it, another tab never sees it, sign-out drops it
        await page.reload()
        await expect(page.locator("body[data-view=member]")).to_have_count(1)
        other = await context.new_page()
        await other.goto(team.url + "/ui/")
        await expect(other.get_by_role("heading", name="Sign in")).to_be_visible()
        assert await other.evaluate("sessionStorage.length") == 0
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0
        assert await page.locator("#pool-table tbody tr").count() == 0
        await context.close()

        # a client with a model allow-list and no paid fallback sees its own
        recorder = Recorder()
        context, page = await new_page(browser, recorder)
        await sign_in(page, team.url + "/ui/", BOT_KEY, "member")
        bot = [m for m in await v1_models(team.url, BOT_KEY) if fnmatchcase(m, "Qwen/*")]
        assert bot
        assert await page.locator("#models code").all_text_contents() == bot
        await expect(page.locator('#limits [data-field="fallback"]')).to_have_text("not allowed")
        await expect(page.locator('#limits [data-field="daily_limit"]')).to_have_text("no cap")
        await expect(page.locator('#limits [data-field="models"]')).to_have_text("Qwen/*")
        clients = await team.admin("/admin/clients")
        await check_usage(
            page, next(c for c in clients["clients"] if c["name"] == "ci-bot"), clients
        )
        await audit(context, page, recorder, BOT_KEY)
        await context.close()


async def check_pool(page: Page, quota: dict[str, Any], config: dict[str, Any]) -> None:
    """The pool table equals /admin/quota: per provider its figures, per model the sum."""
    rows = {row["@id"]: row for row in await table(page, "pool-table")}
    limits = config["providers"][0]["model_limits"]
    for provider in quota["providers"]:
        row = rows.pop(provider["name"] + "|")
        assert row["remaining"] == shown(provider["remaining"])
        assert row["used"] == str(provider["used"])
        assert row["limit"] == shown(provider["limit"])
        usable = [k for k in provider["keys"] if k["state"] in ("available", "cooling")]
        assert row["keys"] == f"{len(usable)} of {len(provider['keys'])}"
        for model_id, model_row in list(rows.items()):
            if model_id.startswith(provider["name"] + "|"):
                model = model_row["model"]
                cap = limits.get(model, MODEL_LIMIT) if provider["name"] == "modelscope" else None
                expected = model_left(provider, model, cap)
                assert model_row["remaining"] == str(expected), model_id
                del rows[model_id]
    assert not rows
    # the lines worth showing: aliases' models, models with a limit of their own, models served
    ids = [r["@id"] for r in await table(page, "pool-table")]
    assert ids == [
        "modelscope|",
        f"modelscope|{MODEL}",
        f"modelscope|{R1}",
        f"modelscope|{OTHER}",
        "bailian|",
        "bailian|qwen3-32b",
    ]


async def check_usage(page: Page, me: dict[str, Any], clients: dict[str, Any]) -> None:
    rows = {row["@id"]: row for row in await table(page, "mine-table")}
    today, yesterday = rows["today"], rows["yesterday"]
    assert today["day"] == f"Today, {clients['day']}"
    assert yesterday["day"] == f"Yesterday, {clients['yesterday']}"
    assert (today["used"], today["free_used"]) == (
        str(me["today"]["used"]),
        str(me["today"]["free_used"]),
    )
    assert today["remaining"] == shown(me["today"]["remaining"])
    assert yesterday["used"] == str(me["yesterday"]["used"])
    for row, day in ((today, me["today"]), (yesterday, me["yesterday"])):
        assert row["tokens"] == str(day["tokens"]["total"])
        assert row["cost"] == (", ".join(f"{amount(v)} {c}" for c, v in day["cost"].items()) or "0")
    shares = page.locator('#limits [data-field="fair_share"]')
    if me["today"]["fair_share"]:
        expected = "; ".join(
            f"{s['provider']}: used {s['used']} of {s['share']} ({s['remaining']} left)"
            for s in me["today"]["fair_share"]
        )
        await expect(shares).to_have_text(expected)
    else:
        await expect(shares).to_contain_text("not in force")
    await expect(page.locator('#limits [data-field="share"]')).to_have_text(f"{me['share']:g}")


async def test_member_view_shows_tokens_cost_and_limits(
    browser: Browser, gateway_clock: GatewayClock
) -> None:
    """Usage put into the store as the request path records it: the client's tokens and cost of
    today and yesterday, and what is left of its daily tokens and budget, as /ui/api/me says."""
    settings = settings_with_money()
    store = MemoryStore()
    await store.record_usage("b", usage_of_two_days(settings, gateway_clock.now))
    async with serving(settings, gateway_clock, store) as (url, _app):
        recorder = Recorder()
        context, page = await new_page(browser, recorder)
        await sign_in(page, url + "/ui/", CLIENT_KEY, "member")
        rows = {row["@id"]: row for row in await table(page, "mine-table")}
        assert (rows["today"]["tokens"], rows["today"]["cost"]) == ("1890", "1.25 CNY")
        assert (rows["yesterday"]["tokens"], rows["yesterday"]["cost"]) == ("4000", "0.50 CNY")
        limits = page.locator("#limits")
        await expect(limits.locator('[data-field="daily_tokens"]')).to_have_text(
            "5000 tokens (3110 left)"
        )
        await expect(limits.locator('[data-field="daily_budget"]')).to_have_text(
            "2.00 CNY (0.75 left)"
        )
        await expect(limits.locator('[data-field="per_minute"]')).to_have_text(
            "30 requests, 90000 tokens a minute"
        )
        await context.close()
        context, page = await new_page(browser, recorder)
        await sign_in(page, url + "/ui/", BOTS_KEY, "member")
        rows = {row["@id"]: row for row in await table(page, "mine-table")}
        assert (rows["today"]["tokens"], rows["today"]["cost"]) == ("400", "3.00 CNY")
        assert (rows["yesterday"]["tokens"], rows["yesterday"]["cost"]) == ("0", "0")
        limits = page.locator("#limits")
        for name in ("daily_tokens", "daily_budget", "per_minute"):
            await expect(limits.locator(f'[data-field="{name}"]')).to_have_text("no cap")
        await context.close()


async def v1_models(url: str, key: str) -> list[str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return [m["id"] for m in (await r.json())["data"]]


async def test_admin_view_matches_the_api_and_disables_the_next_key(
    browser: Browser, gateway_clock: GatewayClock, tmp_path: Path
) -> None:
    async with team_gateway(tmp_path, gateway_clock) as team:
        recorder = Recorder()
        context, page = await new_page(browser, recorder, viewport={"width": 1280, "height": 900})
        await sign_in(page, team.url + "/ui/", ADMIN_KEY, "admin")
        await expect(page.locator("#who")).to_have_text("Signed in as the admin")
        quota = await team.admin("/admin/quota")
        await check_keys(page, quota)
        await check_clients(page, await team.admin("/admin/clients"))
        await check_pool(page, quota, team.config)
        await expect(page.locator("#mine")).to_be_hidden()

        # spent and cooling look different at a glance: colour, symbol and word
        states = {r["key"]: r["@state"] for r in await table(page, "keys-table")}
        assert states == {
            "alice": "exhausted",
            "bob": "cooling",
            "carol": "available",
            "dave": "available",
            "main": "available",
        }
        spent, cooling = (badge(page, "modelscope", k) for k in ("alice", "bob"))
        await expect(spent).to_have_text("■ exhausted · resets in 10h 00m")
        await expect(cooling).to_have_text("◔ cooling · back in 1s")
        colours = [await colour(b) for b in (spent, cooling)]
        assert colours[0] != colours[1]

        # the key that would serve next (fill_first: the first usable key with quota left)
        nxt = next(k["name"] for k in quota["providers"][0]["keys"] if k["state"] == "available")
        assert nxt == "carol"
        carol_before, dave_before = team.used("carol"), team.used("dave")
        disable = page.get_by_role("button", name="Disable modelscope/carol")
        await disable.click()
        dialog = page.get_by_role("dialog")
        await expect(dialog).to_be_visible()
        await expect(dialog).to_contain_text("Disable key modelscope/carol?")
        await page.get_by_role("button", name="Cancel").click()
        await expect(dialog).to_be_hidden()
        await expect(page.locator("#status")).to_have_text("Nothing was changed.")
        assert (await team.admin("/admin/quota"))["providers"][0]["keys"][2]["state"] == "available"

        await disable.click()
        await page.get_by_label("Reason").fill("rotating the token")
        await page.get_by_role("button", name="Confirm").click()
        await expect(page.locator("#status")).to_have_text("Key modelscope/carol disabled.")
        row = page.locator('#keys-table tr[data-key="carol"]')
        await expect(row).to_have_attribute("data-state", "disabled")
        await expect(badge(page, "modelscope", "carol")).to_have_text(
            "⊘ disabled · rotating the token"
        )
        served = await team.ask()
        assert served == "dave"
        assert (team.used("carol"), team.used("dave")) == (carol_before, dave_before + 1)
        await expect(
            page.locator('#keys-table tr[data-key="dave"] [data-field="used"]')
        ).to_have_text("1")
        await check_keys(page, await team.admin("/admin/quota"))
        disabled = await colour(badge(page, "modelscope", "carol"))
        assert len({*colours, disabled, await colour(badge(page, "modelscope", "dave"))}) == 4
        await snap(page, "ui-admin.png", tmp_path)

        # enable it again, and reset alice's counts, each after a confirmation
        await page.get_by_role("button", name="Enable modelscope/carol").click()
        await page.get_by_role("button", name="Confirm").click()
        await expect(row).to_have_attribute("data-state", "available")
        await page.get_by_role("button", name="Reset today's counts of modelscope/alice").click()
        await page.get_by_role("button", name="Confirm").click()
        alice = page.locator('#keys-table tr[data-key="alice"]')
        await expect(alice).to_have_attribute("data-state", "available")
        await expect(alice.locator('[data-field="used"]')).to_have_text("0")
        await check_keys(page, await team.admin("/admin/quota"))

        # reload the configuration: a new client appears
        config = yaml.safe_load(team.config_path.read_text(encoding="utf-8"))
        config["clients"].append({"name": "newcomer", "key": "sk-test-ui-newcomer-7"})
        team.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        await page.get_by_role("button", name="Reload the configuration").click()
        await page.get_by_role("button", name="Confirm").click()
        await expect(page.locator("#status")).to_have_text(
            "Configuration reloaded: 2 providers, 5 keys, 3 clients."
        )
        await expect(page.locator('#clients-table tr[data-client="newcomer"]')).to_have_count(1)
        await check_clients(page, await team.admin("/admin/clients"))
        await audit(context, page, recorder, ADMIN_KEY)
        await context.close()


async def colour(locator: Any) -> str:
    background: str = await locator.evaluate("(e) => getComputedStyle(e).backgroundColor")
    return background


def badge(page: Page, provider: str, key: str) -> Any:
    return page.locator(f'#keys-table tr[data-id="{provider}/{key}"] .badge')


async def check_keys(page: Page, quota: dict[str, Any]) -> None:
    """Each key's used, limit, remaining and state on the page equal /admin/quota's."""
    rows = {row["@id"]: row for row in await table(page, "keys-table")}
    expected = {f"{p['name']}/{k['name']}": k for p in quota["providers"] for k in p["keys"]}
    assert rows.keys() == expected.keys()
    for key_id, key in expected.items():
        row = rows[key_id]
        assert row["used"] == str(key["used"]), key_id
        assert row["limit"] == shown(key["limit"]), key_id
        assert row["remaining"] == shown(key["remaining"]), key_id
        assert row["@state"] == key["state"], key_id
        for model in key["models"]:
            assert f"{model['model']} {model['used']} / {shown(model['limit'])}" in row["models"]


async def check_clients(page: Page, clients: dict[str, Any]) -> None:
    rows = {row["@id"]: row for row in await table(page, "clients-table")}
    assert list(rows) == [c["name"] for c in clients["clients"]]
    for client in clients["clients"]:
        row = rows[client["name"]]
        assert row["used"] == str(client["today"]["used"])
        assert row["free_used"] == str(client["today"]["free_used"])
        assert row["daily_limit"] == shown(client["daily_limit"])
        assert row["remaining"] == shown(client["today"]["remaining"])
        assert row["yesterday"] == str(client["yesterday"]["used"])
        assert row["fallback"] == ("yes" if client["fallback"] else "no")


async def test_keyboard_labels_contrast_and_a_phone(
    browser: Browser, gateway_clock: GatewayClock, tmp_path: Path
) -> None:
    async with team_gateway(tmp_path, gateway_clock) as team:
        recorder = Recorder()
        context, page = await new_page(browser, recorder)
        await page.goto(team.url + "/ui/")
        # the key field has the focus; Tab reaches the button; Enter signs in
        await expect(page.locator("#key")).to_be_focused()
        await page.keyboard.press("Shift+Tab")
        await expect(page.get_by_role("link", name="Skip to the figures")).to_be_focused()
        await page.keyboard.press("Tab")
        await expect(page.locator("#key")).to_be_focused()
        await page.keyboard.type(ADMIN_KEY)
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("button", name="Sign in")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator("body[data-view=admin]")).to_have_count(1)

        # every control is reachable with Tab, in order
        controls = await page.evaluate(CONTROLS)
        assert len(controls) >= 5 * 2 + 3  # two per key, refresh, sign out, reload
        reached: list[str] = []
        for _ in range(len(controls) + 5):
            await page.keyboard.press("Tab")
            reached.append(await page.evaluate(ACTIVE))
        assert set(controls) <= set(reached), set(controls) - set(reached)
        # ...and works: Disable from the keyboard opens the confirmation, Escape cancels it
        await page.get_by_role("button", name="Disable modelscope/dave").focus()
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("dialog")).to_be_visible()
        await expect(page.get_by_label("Reason")).to_be_focused()
        await page.keyboard.press("Escape")
        await expect(page.get_by_role("dialog")).to_be_hidden()
        await expect(page.get_by_role("button", name="Disable modelscope/dave")).to_be_focused()
        assert (await team.admin("/admin/quota"))["providers"][0]["keys"][3]["state"] == "available"

        # labels and names, and a contrast of at least 4.5:1 for every piece of text
        assert await page.evaluate(UNNAMED) == []
        assert await page.evaluate(LOW_CONTRAST) == []
        await context.close()

        # a phone: no sideways scrolling, the tables become cards
        recorder = Recorder()
        context, page = await new_page(
            browser,
            recorder,
            viewport={"width": 390, "height": 844},
            is_mobile=True,
            has_touch=True,
            device_scale_factor=2,
        )
        await sign_in(page, team.url + "/ui/", TEAM_KEY, "member")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        card = page.locator('#pool-table tr[data-id="modelscope|"]')
        assert await card.evaluate("(row) => getComputedStyle(row).display") == "block"
        assert await page.evaluate(LOW_CONTRAST) == []
        await snap(page, "ui-phone.png", tmp_path, full_page=False)
        await context.close()


CONTROLS = """() => Array.from(
    document.querySelectorAll("a[href], button, input, select, textarea"),
).filter((e) => e.offsetParent !== null && !e.closest("dialog"))
 .map((e) => e.id || e.getAttribute("aria-label") || e.textContent.trim())"""
ACTIVE = """() => {
    const e = document.activeElement;
    return e.id || e.getAttribute("aria-label") || e.textContent.trim();
}"""
UNNAMED = """() => Array.from(document.querySelectorAll("button, input, a[href]")).filter((e) => {
    if (e.tagName === "INPUT") return e.labels.length === 0 && !e.getAttribute("aria-label");
    return !(e.getAttribute("aria-label") || e.textContent.trim());
}).map((e) => e.outerHTML)"""
LOW_CONTRAST = """() => {
    const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
    const lum = ([r, g, b]) => {
        const f = (v) => {
            v /= 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
        };
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (e) => {
        for (; e; e = e.parentElement) {
            const c = rgb(getComputedStyle(e).backgroundColor);
            if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
        }
        return [255, 255, 255];
    };
    const low = [];
    for (const e of document.querySelectorAll("body *")) {
        const text = Array.from(e.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim());
        if (!text || e.offsetParent === null) continue;
        const a = lum(rgb(getComputedStyle(e).color)), b = lum(background(e));
        const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
        if (ratio < 4.5) {
            low.push(`${e.tagName} ${e.textContent.trim().slice(0, 40)} ${ratio.toFixed(2)}`);
        }
    }
    return low;
}"""


async def test_behind_a_reverse_proxy_with_a_path_prefix(
    browser: Browser, gateway_clock: GatewayClock, tmp_path: Path
) -> None:
    """A proxy serves the gateway under /team-router and strips it (server.root_path says so):
    the page loads, calls its API through the proxy, and shows the base URL to paste."""
    async with (
        team_gateway(tmp_path, gateway_clock, root_path="/team-router", traffic=False) as team,
        strip_prefix_proxy(team.url, "/team-router") as proxy,
    ):
        recorder = Recorder()
        context, page = await new_page(browser, recorder)
        await page.goto(proxy + "/team-router/ui")  # no slash: redirected to ui/
        assert page.url == proxy + "/team-router/ui/"
        await sign_in(page, page.url, TEAM_KEY, "member")
        base = proxy + "/team-router/v1"
        await expect(page.locator("#base-url")).to_have_text(base)
        await expect(page.locator("#api-host")).to_have_text(proxy + "/team-router")
        await expect(page.locator("#root-path-warning")).to_be_hidden()
        # the URL shown works as an SDK's base URL, through the proxy
        assert await team.ask(base_url=base) == "alice"
        today = page.locator('#mine-table tr[data-id="today"] [data-field="used"]')
        await expect(today).to_have_text("1")
        assert {r.url.startswith(proxy + "/team-router/") for r in recorder.requests} == {True}
        await audit(context, page, recorder, TEAM_KEY)
        await context.close()


@asynccontextmanager
async def strip_prefix_proxy(upstream: str, prefix: str) -> AsyncIterator[str]:
    """A tiny reverse proxy: ``prefix/...`` -> ``upstream/...``, headers and body passed on."""
    hop = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
    async with aiohttp.ClientSession(auto_decompress=False) as http:

        async def forward(request: web.Request) -> web.Response:
            path = request.raw_path.removeprefix(prefix)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in hop | {"host"}}
            async with http.request(
                request.method,
                upstream + path,
                headers=headers,
                data=await request.read(),
                allow_redirects=False,
            ) as answer:
                body = await answer.read()
                out = {k: v for k, v in answer.headers.items() if k.lower() not in hop}
                return web.Response(status=answer.status, body=body, headers=out)

        app = web.Application()
        app.router.add_route("*", prefix + "/{tail:.*}", forward)
        async with running(app) as url:
            yield url


async def test_page_files_headers_and_the_me_endpoint(
    gateway_clock: GatewayClock, tmp_path: Path
) -> None:
    """The security headers on the page, its files and its API; no inline script or style; the
    summary's keys: client, admin, missing, wrong."""
    async with team_gateway(tmp_path, gateway_clock) as team, aiohttp.ClientSession() as http:
        answers: list[str] = []
        for path in ("/ui/", "/ui/app.js", "/ui/app.css", "/ui/api/me", "/ui/nothing"):
            async with http.get(team.url + path) as r:
                assert r.headers["Content-Security-Policy"] == CSP
                assert r.headers["Referrer-Policy"] == "no-referrer"
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["X-Frame-Options"] == "DENY"
                assert "set-cookie" not in r.headers
                text = await r.text()
                answers.append(text)
                if path == "/ui/":
                    html = text
                    assert r.content_type == "text/html"
                if path == "/ui/app.js":
                    script = text
                    assert r.content_type == "text/javascript"
        assert "frame-ancestors 'none'" in CSP
        assert "'unsafe-inline'" not in CSP
        assert "'unsafe-eval'" not in CSP
        # no inline script, style or handler: the CSP would block it, and nothing needs it
        assert re.findall(r"<script\b[^>]*>", html) == ['<script src="app.js" defer>']
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=|javascript:", html)
        assert not re.search(r"<input[^>]*\sname=", html)  # no field a form could submit
        # every URL relative to the page (a proxy's prefix works); the page writes text only
        assert not re.search(r"""(src|href)="/""", html)
        paths = re.findall(r"""(?:api\(|const path =)\s*["']([^"']*)""", script)
        assert len(paths) >= 5
        assert all(p.startswith(("api/", "../admin/")) for p in paths), paths
        for unsafe in ("innerHTML", "eval(", "localStorage", "document.cookie"):
            assert unsafe not in script
        assert "const REFRESH_MS = 5000;" in script  # the README's "every 5 s"
        for source in answers[:3]:  # the page's three files: nothing from elsewhere
            assert "://" not in source

        async with http.get(team.url + "/ui", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (308, "ui/")
        for headers, code in (
            ({}, "missing_api_key"),
            ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),
            ({"X-Api-Key": TEAM_KEY + "x"}, "invalid_api_key"),
        ):
            async with http.get(team.url + "/ui/api/me", headers=headers) as r:
                assert r.status == 401
                body = await r.json()
                assert set(body["error"]) == {"message", "type", "param", "code"}
                assert body["error"]["code"] == code
                assert r.headers["Cache-Control"] == "no-store"
        summaries = {}
        for key in (TEAM_KEY, BOT_KEY, ADMIN_KEY):
            async with http.get(team.url + "/ui/api/me", headers={"X-Api-Key": key}) as r:
                assert r.status == 200
                assert r.headers["Cache-Control"] == "no-store"
                answers.append(await r.text())
                summaries[key] = await r.json()
        team_me, admin_me = summaries[TEAM_KEY], summaries[ADMIN_KEY]
        assert (team_me["role"], team_me["name"]) == ("client", "team")
        assert (admin_me["role"], admin_me["name"], admin_me["client"]) == ("admin", None, None)
        assert (team_me["day"], team_me["yesterday"]) == ("2026-11-29", "2026-11-28")
        assert team_me["next_reset"]["in_seconds"] == 10 * 3600  # 14:00 in Shanghai
        assert team_me["next_reset"]["iso"] == "2026-11-30T00:00:00+08:00"
        assert team_me["base_path"] == "/v1"
        assert all(isinstance(p["keys"], int) for p in team_me["pool"])  # counts, not names
        for name, _, _ in [*KEYS, ("main", "", 0)]:  # a member sees the pool, not its keys
            assert f'"{name}"' not in json.dumps(summaries)
        async with http.get(team.url + "/admin/quota", headers={"X-Api-Key": TEAM_KEY}) as r:
            assert r.status == 403  # the page gives a client no admin rights
        async with http.get(team.url + "/admin/quota", headers={"X-Api-Key": ADMIN_KEY}) as r:
            assert r.headers["Cache-Control"] == "no-store"  # the figures the page reads
        for answer in answers:
            assert all(secret not in answer for secret in SECRETS)


def test_the_page_files_are_package_data() -> None:
    """router/static holds the page's files, all served, all shipped in the wheel."""
    files = {p.name for p in (ROOT / "router" / "static").iterdir()}
    assert files == set(ASSETS)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["router"]
    assert all(any(fnmatchcase(f"static/{name}", p) for p in patterns) for name in files)
