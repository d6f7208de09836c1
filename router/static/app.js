// modelscope-router's web page: plain JavaScript, no framework, no build step.
//
// The key a person signs in with lives only in this tab's sessionStorage and goes to the
// gateway in the Authorization header. It is never put in a URL, a cookie or the page.
// Every URL is relative to the page (…/ui/), so the page works behind a proxy's path prefix.
"use strict";

(() => {
  const STORAGE = "modelscope-router.key";
  const REFRESH_MS = 5000;
  const $ = (id) => document.getElementById(id);

  let timer = null;
  let generation = 0; // a sign-out or a new sign-in makes older answers stale

  // -- talking to the gateway ---------------------------------------------------------------

  function storedKey() {
    return sessionStorage.getItem(STORAGE);
  }

  async function api(path, method = "GET", body = undefined) {
    const headers = { Accept: "application/json" };
    const key = storedKey();
    if (key) headers.Authorization = "Bearer " + key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(new URL(path, document.baseURI), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
      referrerPolicy: "no-referrer",
    });
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    return { status: response.status, ok: response.ok, data };
  }

  function errorText(answer) {
    const message = answer.data && answer.data.error && answer.data.error.message;
    return message || "The gateway answered HTTP " + answer.status + ".";
  }

  // -- formatting ---------------------------------------------------------------------------

  function count(value) {
    return value === null || value === undefined ? "no cap" : String(value);
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    const hours = Math.floor(s / 3600);
    const minutes = Math.floor((s % 3600) / 60);
    const rest = s % 60;
    const two = (n) => String(n).padStart(2, "0");
    if (hours) return hours + "h " + two(minutes) + "m";
    if (minutes) return minutes + "m " + two(rest) + "s";
    return rest + "s";
  }

  function wallClock(iso) {
    // "2026-11-30T00:00:00+08:00" -> "2026-11-30 00:00" (already in the quota's zone)
    return iso.slice(0, 10) + " " + iso.slice(11, 16);
  }

  function setText(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  function show(id, visible) {
    $(id).hidden = !visible;
  }

  function status(text, isError = false) {
    const element = $("status");
    element.classList.toggle("error", isError);
    element.textContent = text;
  }

  // -- tables, updated in place (focus and scroll stay where they are) ----------------------

  function cell(row, field, label, className) {
    const td = document.createElement("td");
    td.dataset.field = field;
    td.dataset.label = label;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function field(row, name) {
    return row.querySelector('[data-field="' + name + '"]');
  }

  function syncRows(tbody, items, idOf, build, update) {
    const existing = new Map(Array.from(tbody.rows, (row) => [row.dataset.id, row]));
    let previous = null;
    for (const item of items) {
      const id = idOf(item);
      let row = existing.get(id);
      if (row) {
        existing.delete(id);
      } else {
        row = build(item);
        row.dataset.id = id;
      }
      update(row, item);
      const expected = previous ? previous.nextSibling : tbody.firstChild;
      if (row !== expected) tbody.insertBefore(row, expected);
      previous = row;
    }
    for (const row of existing.values()) row.remove();
  }

  function columns(specs) {
    return () => {
      const row = document.createElement("tr");
      for (const [name, label, className] of specs) cell(row, name, label, className);
      return row;
    };
  }

  // -- the views ----------------------------------------------------------------------------

  function renderDay(me) {
    const reset = me.next_reset;
    setText(
      $("day"),
      "Quota day " + me.day + " (" + me.timezone + "). The pool resets at " +
        wallClock(reset.iso) + " " + me.timezone + ", in " + duration(reset.in_seconds) + "."
    );
    $("day").dataset.resetIn = String(reset.in_seconds);
  }

  function poolRows(me) {
    const rows = [];
    for (const provider of me.pool) {
      rows.push({ kind: "provider", provider });
      for (const model of provider.models) rows.push({ kind: "model", provider, model });
    }
    return rows;
  }

  const poolColumns = columns([
    ["provider", "Provider"],
    ["model", "Model"],
    ["remaining", "Left today", "num"],
    ["used", "Used", "num"],
    ["limit", "Daily limit", "num"],
    ["keys", "Keys serving"],
  ]);

  function renderPool(me) {
    syncRows(
      $("pool-table").tBodies[0],
      poolRows(me),
      (r) => r.provider.provider + "|" + (r.kind === "model" ? r.model.model : ""),
      poolColumns,
      (row, r) => {
        const p = r.provider;
        row.dataset.provider = p.provider;
        if (r.kind === "provider") {
          row.className = "group";
          setText(field(row, "provider"), p.provider + (p.paid ? " (paid)" : " (free)"));
          setText(field(row, "model"), "all models");
          setText(field(row, "remaining"), count(p.remaining));
          setText(field(row, "used"), String(p.used));
          setText(field(row, "limit"), count(p.limit));
          setText(field(row, "keys"), p.usable_keys + " of " + p.keys);
        } else {
          row.dataset.model = r.model.model;
          setText(field(row, "provider"), p.provider);
          setText(field(row, "model"), r.model.model);
          setText(field(row, "remaining"), count(r.model.remaining));
          for (const name of ["used", "limit", "keys"]) setText(field(row, name), "");
        }
      }
    );
  }

  const mineColumns = columns([
    ["day", "Day"],
    ["used", "Calls", "num"],
    ["free_used", "Of which free", "num"],
    ["remaining", "Left of my daily limit", "num"],
    ["tokens", "Tokens", "num"],
    ["cost", "Cost", "num"],
  ]);

  function money(value) {
    // as the status CLI: two decimals, or every digit down to the nano for small amounts
    if (value === 0 || Math.abs(value) >= 0.01) return value.toFixed(2);
    return value.toFixed(9).replace(/0+$/, "");
  }

  function costs(cost) {
    return Object.entries(cost).map(([currency, v]) => money(v) + " " + currency).join(", ") || "0";
  }

  function perMinute(client) {
    const parts = [];
    if (client.rpm !== null) parts.push(client.rpm + " requests");
    if (client.tpm !== null) parts.push(client.tpm + " tokens");
    return parts.length ? parts.join(", ") + " a minute" : "no cap";
  }

  function renderMine(me) {
    const client = me.client;
    show("mine", client !== null);
    if (client === null) return;
    const days = [
      { id: "today", label: "Today, " + me.day, usage: client.today },
      { id: "yesterday", label: "Yesterday, " + me.yesterday, usage: client.yesterday },
    ];
    syncRows($("mine-table").tBodies[0], days, (d) => d.id, mineColumns, (row, d) => {
      setText(field(row, "day"), d.label);
      setText(field(row, "used"), String(d.usage.used));
      setText(field(row, "free_used"), String(d.usage.free_used));
      setText(field(row, "remaining"), d.id === "today" ? count(d.usage.remaining) : "");
      setText(field(row, "tokens"), String(d.usage.tokens.total));
      setText(field(row, "cost"), costs(d.usage.cost));
    });
    const facts = [
      ["daily_limit", "My daily limit",
        client.daily_limit === null ? "no cap" : count(client.daily_limit) + " calls"],
      ["daily_tokens", "My daily tokens",
        client.daily_tokens === null ? "no cap"
          : client.daily_tokens + " tokens (" + client.today.tokens_remaining + " left)"],
      ["daily_budget", "My daily budget",
        client.daily_budget === null ? "no cap"
          : money(client.daily_budget) + " " + client.budget_currency + " (" +
            money(client.today.budget_remaining) + " left)"],
      ["per_minute", "My per-minute limits", perMinute(client)],
      ["share", "My fair-share weight", String(client.share)],
      ["fallback", "Paid fallback", client.fallback ? "allowed" : "not allowed"],
      ["models", "Models allowed", client.models === null ? "all" : client.models.join(", ")],
      ["fair_share", "My fair share today", fairShare(client.today.fair_share, me.fair_share)],
    ];
    const list = $("limits");
    if (list.children.length !== facts.length * 2) {
      list.replaceChildren();
      for (const [name, label] of facts) {
        const dt = document.createElement("dt");
        dt.textContent = label;
        const dd = document.createElement("dd");
        dd.dataset.field = name;
        list.append(dt, dd);
      }
    }
    for (const [name, , text] of facts) setText(list.querySelector('[data-field="' + name + '"]'), text);
  }

  function fairShare(shares, settings) {
    if (!shares.length) {
      return (
        "not in force: it starts when less than " + Math.round(settings.below * 100) +
        "% of a free provider's pool is left"
      );
    }
    return shares
      .map((s) => s.provider + ": used " + s.used + " of " + s.share + " (" + s.remaining + " left)")
      .join("; ");
  }

  function renderConnect(me) {
    // The scheme and host this tab reached (a proxy's, behind one) and server.root_path.
    const host = window.location.origin + me.root_path;
    setText($("base-url"), host + "/v1");
    setText($("api-host"), host);
    const here = window.location.pathname;
    const misplaced = !here.startsWith(me.root_path + "/ui/");
    show("root-path-warning", misplaced);
    if (misplaced) {
      setText(
        $("root-path-warning"),
        "This page is served at " + here + ", but the gateway's server.root_path is \"" +
          me.root_path + "\": the URLs above may be wrong; ask the admin to set it."
      );
    }
    const list = $("models");
    const ids = me.models;
    if (list.dataset.ids !== ids.join("\n")) {
      list.dataset.ids = ids.join("\n");
      list.replaceChildren(
        ...ids.map((id) => {
          const item = document.createElement("li");
          const code = document.createElement("code");
          code.textContent = id;
          item.appendChild(code);
          return item;
        })
      );
    }
  }

  const STATE_TEXT = {
    available: "● available",
    exhausted: "■ exhausted",
    cooling: "◔ cooling",
    disabled: "⊘ disabled",
  };

  function stateText(item, quota) {
    let text = STATE_TEXT[item.state] || item.state;
    if (item.state === "cooling" && item.until) {
      text += " · back in " + duration(item.until.unix - quota.now.unix);
    } else if (item.state === "exhausted") {
      text += " · resets in " + duration(quota.next_reset.in_seconds);
    } else if (item.state === "disabled" && item.reason) {
      text += " · " + item.reason;
    }
    return text;
  }

  function keyRow() {
    const row = columns([
      ["provider", "Provider"],
      ["key", "Key"],
      ["used", "Used", "num"],
      ["limit", "Limit", "num"],
      ["remaining", "Left", "num"],
      ["state", "State"],
      ["models", "Models"],
      ["actions", "Actions", "actions"],
    ])();
    const badge = document.createElement("span");
    badge.className = "badge";
    field(row, "state").appendChild(badge);
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.dataset.action = "disable";
    const reset = document.createElement("button");
    reset.type = "button";
    reset.dataset.action = "reset";
    reset.textContent = "Reset";
    field(row, "actions").append(toggle, reset);
    return row;
  }

  function renderKeys(quota) {
    const items = [];
    for (const provider of quota.providers) {
      for (const key of provider.keys) items.push({ provider: provider.name, key });
    }
    syncRows(
      $("keys-table").tBodies[0],
      items,
      (i) => i.provider + "/" + i.key.name,
      keyRow,
      (row, { provider, key }) => {
        row.className = "state-" + key.state;
        row.dataset.provider = provider;
        row.dataset.key = key.name;
        row.dataset.state = key.state;
        setText(field(row, "provider"), provider);
        setText(field(row, "key"), key.name);
        setText(field(row, "used"), String(key.used));
        setText(field(row, "limit"), count(key.limit));
        setText(field(row, "remaining"), count(key.remaining));
        const badge = field(row, "state").firstChild;
        badge.className = "badge badge-" + key.state;
        setText(badge, stateText(key, quota));
        setText(
          field(row, "models"),
          key.models
            .map((m) => {
              const state = m.state === "available" ? "" : " (" + stateText(m, quota) + ")";
              return m.model + " " + m.used + " / " + count(m.limit) + state;
            })
            .join("\n")
        );
        const [toggle, reset] = field(row, "actions").children;
        const action = key.state === "disabled" ? "enable" : "disable";
        toggle.dataset.action = action;
        toggle.className = action === "disable" ? "danger" : "";
        setText(toggle, action === "disable" ? "Disable" : "Enable");
        const name = provider + "/" + key.name;
        toggle.setAttribute("aria-label", (action === "disable" ? "Disable " : "Enable ") + name);
        reset.setAttribute("aria-label", "Reset today's counts of " + name);
      }
    );
  }

  const clientColumns = columns([
    ["name", "Client"],
    ["used", "Today", "num"],
    ["free_used", "Of which free", "num"],
    ["daily_limit", "Daily limit", "num"],
    ["remaining", "Left", "num"],
    ["yesterday", "Yesterday", "num"],
    ["share", "Share", "num"],
    ["fallback", "Fallback"],
    ["models", "Models"],
    ["fair_share", "Fair share"],
  ]);

  function renderClients(clients) {
    syncRows($("clients-table").tBodies[0], clients.clients, (c) => c.name, clientColumns, (row, c) => {
      row.dataset.client = c.name;
      setText(field(row, "name"), c.name);
      setText(field(row, "used"), String(c.today.used));
      setText(field(row, "free_used"), String(c.today.free_used));
      setText(field(row, "daily_limit"), count(c.daily_limit));
      setText(field(row, "remaining"), count(c.today.remaining));
      setText(field(row, "yesterday"), String(c.yesterday.used));
      setText(field(row, "share"), String(c.share));
      setText(field(row, "fallback"), c.fallback ? "yes" : "no");
      setText(field(row, "models"), c.models === null ? "all" : c.models.join(", "));
      setText(
        field(row, "fair_share"),
        c.today.fair_share.map((s) => s.provider + ": " + s.used + " / " + s.share).join("; ") || "—"
      );
    });
  }

  // -- loading and refreshing ---------------------------------------------------------------

  async function load() {
    const mine = generation;
    const me = await api("api/me");
    if (!me.ok) return { ok: false, answer: me };
    let quota = null;
    let clients = null;
    if (me.data.role === "admin") {
      [quota, clients] = await Promise.all([api("../admin/quota"), api("../admin/clients")]);
      for (const answer of [quota, clients]) if (!answer.ok) return { ok: false, answer };
    }
    if (mine !== generation) return { ok: true }; // signed out meanwhile
    render(me.data, quota && quota.data, clients && clients.data);
    return { ok: true };
  }

  function render(me, quota, clients) {
    const admin = me.role === "admin";
    setText($("who"), admin ? "Signed in as the admin" : "Signed in as client " + me.name);
    show("sign-in", false);
    show("session", true);
    renderDay(me);
    renderPool(me);
    renderMine(me);
    renderConnect(me);
    show("pool", true);
    show("connect", true);
    show("keys", admin);
    show("clients", admin);
    show("config", admin);
    if (admin) {
      renderKeys(quota);
      renderClients(clients);
    }
    document.body.dataset.view = admin ? "admin" : "member";
  }

  async function refresh() {
    clearTimeout(timer);
    timer = null;
    if (storedKey() === null) return;
    if (!document.hidden) {
      try {
        const result = await load();
        if (!result.ok) {
          const { answer } = result;
          if (answer.status === 401 || answer.status === 403) {
            signOut("The gateway no longer accepts this key: " + errorText(answer));
            return;
          }
          status(errorText(answer), true);
        }
      } catch (error) {
        status("The gateway cannot be reached (" + error.message + "). Retrying.", true);
      }
    }
    if (storedKey() !== null) timer = setTimeout(refresh, REFRESH_MS);
  }

  // -- signing in and out -------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const input = $("key");
    const key = input.value.trim();
    input.value = ""; // never kept in the page
    setText($("sign-in-error"), "");
    generation += 1;
    sessionStorage.setItem(STORAGE, key);
    let result;
    try {
      result = await load();
    } catch (error) {
      result = { ok: false, answer: { status: 0, data: null }, error };
    }
    if (!result.ok) {
      sessionStorage.removeItem(STORAGE);
      const text = result.error
        ? "The gateway cannot be reached."
        : result.answer.status === 401
          ? "This key is not accepted: " + errorText(result.answer)
          : errorText(result.answer);
      setText($("sign-in-error"), text);
      input.focus();
      return;
    }
    status("");
    $("main").focus({ preventScroll: true });
    timer = setTimeout(refresh, REFRESH_MS);
  }

  function signOut(reason = "") {
    generation += 1;
    clearTimeout(timer);
    timer = null;
    sessionStorage.removeItem(STORAGE);
    for (const id of ["session", "pool", "mine", "connect", "keys", "clients", "config"]) {
      show(id, false);
    }
    for (const id of ["pool-table", "mine-table", "keys-table", "clients-table"]) {
      $(id).tBodies[0].replaceChildren();
    }
    $("limits").replaceChildren();
    $("models").replaceChildren();
    delete $("models").dataset.ids;
    delete document.body.dataset.view;
    show("sign-in", true);
    status(reason, Boolean(reason));
    $("key").focus();
  }

  // -- the admin's actions, each after a confirmation ---------------------------------------

  function confirmAction(text, askReason) {
    const dialog = $("confirm");
    setText($("confirm-text"), text);
    show("reason-field", askReason);
    $("reason").value = "";
    return new Promise((resolve) => {
      const opener = document.activeElement;
      const done = () => {
        dialog.removeEventListener("close", done);
        const confirmed = dialog.returnValue === "yes";
        const reason = $("reason").value.trim();
        if (opener && opener.isConnected) opener.focus();
        resolve({ confirmed, reason });
      };
      dialog.returnValue = "";
      dialog.addEventListener("close", done);
      dialog.showModal();
      (askReason ? $("reason") : $("confirm-no")).focus();
    });
  }

  const ACTIONS = {
    disable: {
      question: (name) => "Disable key " + name + "? No request will use it until it is enabled.",
      done: (name) => "Key " + name + " disabled.",
    },
    enable: {
      question: (name) => "Enable key " + name + "? Requests may use it again.",
      done: (name) => "Key " + name + " enabled.",
    },
    reset: {
      question: (name) => "Reset today's counts of key " + name + "? Use this after buying quota.",
      done: (name) => "Key " + name + " reset: today's counts are cleared.",
    },
  };

  async function onKeyAction(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const row = button.closest("tr");
    const { provider, key } = row.dataset;
    const action = button.dataset.action;
    const name = provider + "/" + key;
    const { confirmed, reason } = await confirmAction(
      ACTIONS[action].question(name),
      action === "disable"
    );
    if (!confirmed) {
      status("Nothing was changed.");
      return;
    }
    const path =
      "../admin/keys/" + encodeURIComponent(provider) + "/" + encodeURIComponent(key) + "/" + action;
    const answer = await api(path, "POST", action === "disable" && reason ? { reason } : {});
    status(answer.ok ? ACTIONS[action].done(name) : errorText(answer), !answer.ok);
    await refresh();
  }

  async function onReload() {
    const { confirmed } = await confirmAction(
      "Reload the configuration file? A file that is not valid is refused and the running " +
        "configuration stays.",
      false
    );
    if (!confirmed) {
      status("Nothing was changed.");
      return;
    }
    const answer = await api("../admin/reload", "POST");
    if (answer.ok) {
      const d = answer.data;
      status(
        "Configuration reloaded: " + d.providers + " providers, " + d.keys + " keys, " +
          d.clients + " clients."
      );
    } else {
      status(errorText(answer), true);
    }
    await refresh();
  }

  // -- wiring -------------------------------------------------------------------------------

  function start() {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut("Signed out."));
    $("refresh").addEventListener("click", () => refresh());
    $("keys-table").addEventListener("click", onKeyAction);
    $("reload").addEventListener("click", onReload);
    $("confirm-yes").addEventListener("click", () => $("confirm").close("yes"));
    $("confirm-no").addEventListener("click", () => $("confirm").close("no"));
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && storedKey() !== null) refresh();
    });
    if (storedKey() !== null) {
      refresh(); // a reload of the tab keeps the session
    } else {
      $("key").focus();
    }
  }

  start();
})();
