// tfdeploy status page. Plain JS, no build step, no dependencies.
//
// - The token lives in localStorage and goes out as `Authorization: Bearer` on fetches and as
//   `?access_token=` on EventSource URLs (EventSource cannot set headers).
// - The deploys list is polled every 2 s (paused while the tab is hidden); an admin's page also
//   listens to GET /events/stream and refreshes the list as soon as anything happens.
// - The selected deploy follows GET /deploys/{id}/stream (events + terraform output, resumed by
//   EventSource itself with Last-Event-ID). When the stream cannot be opened (an HTTP error,
//   e.g. a server without streams), it falls back to polling /events and /logs and tries the
//   stream again later.
// - A plan (GET /deploys/{id}/plan, fetched when a Planned event arrives) is shown resource by
//   resource with terraform's symbols and colours; Approve and Discard appear for a planned
//   deploy when the caller may deploy to its workspace (their role, from GET /workspaces).
// - A succeeded apply or destroy shows its workspace's outputs (sensitive ones as such, never a
//   value) and resources, from the latest state.
// - Server data only ever reaches the page through textContent / text nodes: no innerHTML.
"use strict";

(() => {
  const TOKEN_KEY = "tfdeploy.token";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled", "discarded"]);
  const KOREAN = {
    queued: "대기중",
    deploying: "배포중",
    retrying: "재시도중",
    planned: "승인 대기",
    failed: "배포 실패",
    succeeded: "배포 완료",
    cancelled: "취소됨",
    discarded: "폐기됨",
  };
  const EVENT_TYPES = [
    "Requested", "Started", "Failed", "Retried", "StatePersisted", "Succeeded", "Destroyed",
    "StateRescued", "CancelRequested", "Cancelled", "Planned", "Approved", "Discarded",
  ];
  // A plan's resource changes as terraform shows them: symbol, words, and the CSS class.
  const CHANGES = {
    create: { symbol: "+", en: "create", ko: "생성" },
    update: { symbol: "~", en: "update", ko: "변경" },
    replace: { symbol: "-/+", en: "replace", ko: "교체" }, // delete, then create
    "replace-first": { symbol: "+/-", en: "replace", ko: "교체" }, // create_before_destroy
    delete: { symbol: "-", en: "delete", ko: "삭제" },
    read: { symbol: "<=", en: "read", ko: "읽기" },
    other: { symbol: "?", en: "change", ko: "기타" },
  };
  const LIST_POLL_MS = 2000;
  const DETAIL_POLL_MS = 1000;
  const LOG_PAGE_LINES = 2000; // GET /deploys/{id}/logs?limit=: lines per answer
  const STREAM_RETRY_MIN_MS = 3000;
  const STREAM_RETRY_MAX_MS = 30000;
  const END_GRACE_MS = 10000; // a terminal deploy's stream is closed if no `end` comes by then
  const MAX_LOG_LINES = 20000;
  const LIST_LIMIT = 50;

  // What the page is doing, for people debugging it (and for the browser tests). No secrets.
  const probe = (window.tfdeploy = {
    eventSourcesOpened: 0,
    streamOpens: 0,
    sseEvents: 0,
    sseLogLines: 0,
    logPolls: 0,
    eventPolls: 0,
    listPolls: 0,
    detailMode: "idle",
    globalMode: "off",
  });

  const state = {
    token: "",
    deploys: new Map(), // id -> deploy (the newest version seen)
    order: [], // ids in the list, newest first
    admin: null, // true / false once known, null while unknown
    listTimer: null,
    listBusy: false,
    listRefreshSoon: null,
    global: null, // EventSource of /events/stream (admins)
    globalTried: false,
    listLoaded: false, // the first page of the list has arrived
    detail: null, // the DeployDetail being shown
    roles: new Map(), // workspace id -> the caller's role in it (null: none), once asked
  };

  // ------------------------------------------------------------------ DOM helpers

  const $ = (id) => document.getElementById(id);

  /** Builds an element. Children that are strings become text nodes: never parsed as HTML. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === null || value === undefined || value === false) continue;
        if (key === "class") node.className = value;
        else if (key === "text") node.textContent = value;
        else if (key.startsWith("on") && typeof value === "function") {
          node.addEventListener(key.slice(2), value);
        } else node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function safeClass(value) {
    return String(value).toLowerCase().replace(/[^a-z0-9_-]/g, "");
  }

  function notify(message, kind = "info", ms = 6000) {
    const box = el("div", { class: `notice notice-${kind}` }, el("span", null, message));
    const close = el("button", { type: "button", class: "notice-close", "aria-label": "Dismiss" }, "✕");
    close.addEventListener("click", () => box.remove());
    box.append(close);
    $("notices").append(box);
    if (ms) setTimeout(() => box.remove(), ms);
  }

  // ------------------------------------------------------------------ formatting

  const timeFmt = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
  const dateTimeFmt = new Intl.DateTimeFormat(undefined, {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });

  function fmtTime(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    const today = new Date().toDateString() === date.toDateString();
    return (today ? timeFmt : dateTimeFmt).format(date);
  }

  function fmtDuration(fromIso, toIso) {
    const ms = new Date(toIso) - new Date(fromIso);
    if (!Number.isFinite(ms) || ms < 0) return "";
    const s = Math.round(ms / 1000);
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${s % 60}s`;
    return `${Math.floor(m / 60)}h ${m % 60}m`;
  }

  function shortId(id) {
    return String(id).slice(0, 8);
  }

  function koreanLabel(deploy) {
    const status = deploy.status;
    if (status === "retrying") return `${KOREAN.retrying} (${deploy.attempt}/${deploy.max_attempts})`;
    if (status === "succeeded" && deploy.action === "plan") return "계획 완료"; // a plan, not a deploy
    return KOREAN[status] || status;
  }

  /** "create", "update", "replace", ... for terraform's actions of one resource change. */
  function changeKind(actions) {
    const key = (actions || []).join(",");
    return {
      create: "create",
      update: "update",
      delete: "delete",
      "delete,create": "replace",
      "create,delete": "replace-first",
      read: "read",
    }[key] || "other";
  }

  /** The symbol of a change, in terraform's colours: -/+ is a red minus and a green plus. */
  function changeSymbol(kind) {
    const parts = { replace: ["-", "/", "+"], "replace-first": ["+", "/", "-"] }[kind];
    if (!parts) return el("span", { class: "pc-sym", "aria-hidden": "true" }, CHANGES[kind].symbol);
    const tone = { "-": "pc-minus", "+": "pc-plus", "/": "" };
    return el(
      "span",
      { class: "pc-sym", "aria-hidden": "true" },
      parts.map((p) => el("span", { class: tone[p] || null }, p)),
    );
  }

  function summaryChips(summary) {
    const s = summary || {};
    return [
      el("span", { class: "pc-count pc-create", "data-count": "add" }, `+${s.add || 0} to add · 생성`),
      el("span", { class: "pc-count pc-update", "data-count": "change" }, `~${s.change || 0} to change · 변경`),
      el("span", { class: "pc-count pc-delete", "data-count": "destroy" }, `-${s.destroy || 0} to destroy · 삭제`),
    ];
  }

  function workspaceRef(deploy) {
    return deploy.workspace_owner ? `${deploy.workspace_owner}:${deploy.workspace}` : deploy.workspace;
  }

  /** The caller's role in the deploy's workspace ("owner", "admin", "deploy", "read"; null:
   *  none), from GET /workspaces (the owner's, page by page), remembered per workspace. */
  async function workspaceRole(deploy) {
    const key = deploy.workspace_id;
    if (!key) return null;
    if (state.roles.has(key)) return state.roles.get(key);
    let after = null;
    let role = null;
    for (let page = 0; page < 20; page += 1) {
      let path = `/workspaces?limit=200&owner=${encodeURIComponent(deploy.workspace_owner || "")}`;
      if (after) path += `&after=${encodeURIComponent(after)}`;
      const answer = await api(path);
      const found = (answer.items || []).find((w) => w.id === key);
      if (found) {
        role = found.role;
        break;
      }
      if (!answer.next) break;
      after = answer.next;
    }
    state.roles.set(key, role);
    return role;
  }

  function badge(deploy) {
    const status = String(deploy.status || "unknown");
    const node = el(
      "span",
      { class: `badge badge-${safeClass(status)}`, "data-status": status },
      el("span", { class: "badge-ko", lang: "ko" }, koreanLabel(deploy)),
      el("span", { class: "badge-en" }, status),
    );
    if (deploy.cancel_requested && !TERMINAL.has(status)) {
      node.append(el("span", { class: "badge-note" }, "cancelling…"));
    }
    return node;
  }

  function stripAnsi(text) {
    // eslint-disable-next-line no-control-regex
    return String(text).replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "");
  }

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
      this.detail = detail;
    }
  }

  async function api(path, { method = "GET", body, headers = {}, raw = false } = {}) {
    const sent = { Accept: raw ? "*/*" : "application/json", ...headers };
    if (state.token) sent.Authorization = `Bearer ${state.token}`;
    if (body !== undefined) sent["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers: sent,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
      });
    } catch (err) {
      throw new ApiError(0, "the server cannot be reached");
    }
    if (!response.ok) {
      let detail = response.statusText || `HTTP ${response.status}`;
      try {
        const payload = await response.json();
        if (payload && payload.detail) detail = String(payload.detail);
      } catch (err) {
        /* not JSON: keep the status text */
      }
      if (response.status === 401) onUnauthorized(detail);
      throw new ApiError(response.status, detail);
    }
    return raw ? response : response.json();
  }

  function tokenQuery() {
    return `access_token=${encodeURIComponent(state.token)}`;
  }

  /** Keeps the newest copy of a deploy: a slow poll answer never overwrites a newer stream one. */
  function mergeDeploy(incoming) {
    if (!incoming || !incoming.id) return null;
    const current = state.deploys.get(incoming.id);
    if (current && isOlder(incoming, current)) return current;
    state.deploys.set(incoming.id, incoming);
    return incoming;
  }

  function isOlder(a, b) {
    if (typeof a.version === "number" && typeof b.version === "number") {
      if (a.version !== b.version) return a.version < b.version;
    }
    return String(a.updated_at || "") < String(b.updated_at || "");
  }

  // ------------------------------------------------------------------ token

  function setToken(token) {
    state.token = token;
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
    resetSession();
  }

  let unauthorizedShown = false;
  function onUnauthorized(detail) {
    stopEverything();
    setListMessage(`The token was refused (${detail}). Enter a valid API token above.`, "error");
    if (!unauthorizedShown) {
      unauthorizedShown = true;
      notify("The API token was refused.", "error");
    }
  }

  function stopEverything() {
    clearTimeout(state.listTimer);
    state.listTimer = null;
    if (state.global) state.global.close();
    state.global = null;
    probe.globalMode = "off";
    if (state.detail) state.detail.stop();
  }

  function resetSession() {
    stopEverything();
    unauthorizedShown = false;
    state.deploys.clear();
    state.roles.clear();
    state.order = [];
    state.admin = null;
    state.globalTried = false;
    state.listLoaded = false;
    if (state.detail) state.detail.destroy();
    state.detail = null;
    renderList();
    showDetailPane(false);
    if (!state.token) {
      setListMessage("Enter an API token above to see your deploys (tfdeploy token create --name you).");
      return;
    }
    setListMessage("Loading…");
    refreshList();
    routeFromHash();
  }

  // ------------------------------------------------------------------ the deploys list

  function setListMessage(text, kind = "") {
    const node = $("list-message");
    node.textContent = text || "";
    node.className = kind === "error" ? "form-error" : "muted";
    node.hidden = !text;
  }

  function scheduleListPoll(ms = LIST_POLL_MS) {
    clearTimeout(state.listTimer);
    if (!state.token) return;
    state.listTimer = setTimeout(refreshList, ms);
  }

  /** A refresh soon, coalescing bursts (the admin's global stream may deliver many events). */
  function refreshListSoon() {
    if (state.listRefreshSoon) return;
    state.listRefreshSoon = setTimeout(() => {
      state.listRefreshSoon = null;
      refreshList();
    }, 150);
  }

  async function refreshList() {
    if (!state.token) return;
    if (state.listBusy) return scheduleListPoll(300);
    if (document.visibilityState === "hidden") return scheduleListPoll();
    state.listBusy = true;
    const token = state.token;
    try {
      const page = await api(`/deploys?limit=${LIST_LIMIT}`);
      probe.listPolls += 1;
      if (token !== state.token) return;
      const ids = [];
      for (const item of page.items || []) {
        mergeDeploy(item);
        ids.push(item.id);
      }
      state.order = ids;
      if (!state.globalTried) {
        // Once the list is known (the admin's feed starts from what it reflects).
        state.globalTried = true;
        startGlobalStream();
      }
      state.listLoaded = true;
      setListMessage("");
      renderList();
      if (state.detail) {
        state.detail.renderHead();
        state.detail.ensureFollowing();
      }
      scheduleListPoll();
    } catch (err) {
      if (err.status === 401) return; // onUnauthorized has stopped everything
      setListMessage(`Could not load deploys: ${err.detail || err.message}. Retrying…`, "error");
      scheduleListPoll(LIST_POLL_MS * 2);
    } finally {
      state.listBusy = false;
    }
  }

  const rows = new Map(); // id -> <li>

  function renderList() {
    const list = $("deploy-list");
    const ids = [...state.order];
    const selected = state.detail ? state.detail.id : null;
    // A deploy just submitted (or opened by link) stays visible even if the page has not
    // caught up with it yet.
    if (selected && !ids.includes(selected) && state.deploys.has(selected)) ids.unshift(selected);
    const wanted = [];
    for (const id of ids) {
      const deploy = state.deploys.get(id);
      if (!deploy) continue;
      let row = rows.get(id);
      if (!row) {
        row = el("li");
        rows.set(id, row);
      }
      fillRow(row, deploy, id === selected);
      wanted.push(row);
    }
    for (const [id, row] of rows) if (!wanted.includes(row)) rows.delete(id);
    const same =
      list.children.length === wanted.length && wanted.every((row, i) => list.children[i] === row);
    if (!same) list.replaceChildren(...wanted);
    $("list-empty").hidden = !(state.token && state.listLoaded && !wanted.length);
    const mode = $("list-mode");
    mode.dataset.mode = state.global ? "live" : state.token ? "polling" : "idle";
    mode.textContent = state.global ? "live" : state.token ? "auto-refresh" : "";
  }

  function fillRow(row, deploy, selected) {
    const key = JSON.stringify([deploy.version, deploy.status, deploy.updated_at, deploy.attempt,
      deploy.cancel_requested, selected, state.admin]);
    if (row.dataset.key === key) return;
    row.dataset.key = key;
    const button = el(
      "button",
      {
        type: "button",
        class: "deploy-row",
        "data-deploy-id": deploy.id,
        "aria-current": selected ? "true" : null,
        onclick: () => selectDeploy(deploy.id),
      },
      badge(deploy),
      el(
        "span",
        { class: "row-main" },
        el("span", { class: "row-ws" }, deploy.workspace),
        el("span", { class: `row-action action-${safeClass(deploy.action)}` }, deploy.action),
      ),
      el(
        "span",
        { class: "row-sub" },
        el("span", { class: "row-attempt", title: "attempt" }, `attempt ${deploy.attempt}/${deploy.max_attempts}`),
        el("time", { datetime: deploy.created_at, title: `created ${deploy.created_at}` }, fmtTime(deploy.created_at)),
        state.admin && deploy.owner ? el("span", { class: "row-owner" }, deploy.owner) : null,
        el("span", { class: "row-id", title: deploy.id }, shortId(deploy.id)),
      ),
    );
    row.replaceChildren(button);
  }

  // ------------------------------------------------------------------ admin: every event, live

  /** Where the global feed should start: just before the newest event the list already
   *  reflects (the feed only wakes the list up; without a start it would replay all history). */
  async function globalStartPosition() {
    let latest = "";
    for (const deploy of state.deploys.values()) {
      if (String(deploy.updated_at || "") > latest) latest = String(deploy.updated_at);
    }
    if (!latest) return 0; // nothing visible yet: nothing to replay either
    const page = await api(`/events?since=${encodeURIComponent(latest)}&limit=1`);
    const first = page.items && page.items[0];
    return first ? Math.max(0, first.position - 1) : null;
  }

  async function startGlobalStream() {
    if (!window.EventSource || !state.token || state.global || state.admin === false) return;
    const token = state.token;
    let start;
    try {
      start = await globalStartPosition();
    } catch (err) {
      start = null;
    }
    if (start === null || token !== state.token || state.global) return;
    const url = `/events/stream?${tokenQuery()}&last_event_id=${start}`;
    // Ask first with fetch: EventSource cannot tell "not an admin" (403) from "no such route".
    const controller = new AbortController();
    let status = 0;
    try {
      const response = await fetch(url, {
        headers: { Accept: "text/event-stream" },
        signal: controller.signal,
        cache: "no-store",
        credentials: "omit",
      });
      status = response.status;
    } catch (err) {
      status = 0;
    } finally {
      controller.abort();
    }
    if (token !== state.token) return;
    if (status === 403) {
      state.admin = false;
      renderList();
      if (state.detail) state.detail.renderHead();
    }
    if (status !== 200) {
      probe.globalMode = status === 403 ? "not-admin" : "unavailable";
      return;
    }
    if (state.global) return;
    state.admin = true;
    const source = new EventSource(url);
    probe.eventSourcesOpened += 1;
    state.global = source;
    probe.globalMode = "connecting";
    const onEvent = () => refreshListSoon();
    source.addEventListener("message", onEvent);
    for (const type of EVENT_TYPES) source.addEventListener(type, onEvent);
    source.addEventListener("open", () => {
      probe.globalMode = "live";
      renderList();
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused for good (an HTTP error): the list keeps polling; try again later.
        if (state.global === source) state.global = null;
        probe.globalMode = "unavailable";
        renderList();
        setTimeout(() => {
          if (token === state.token && !state.global) startGlobalStream();
        }, STREAM_RETRY_MAX_MS);
      } else {
        probe.globalMode = "reconnecting";
      }
    });
    renderList();
  }

  // ------------------------------------------------------------------ one deploy, live

  class DeployDetail {
    constructor(id) {
      this.id = id;
      this.token = state.token;
      this.events = new Map(); // version -> event
      this.maxVersion = 0;
      this.lastSeq = 0;
      this.logLines = 0;
      this.lastAttempt = null;
      this.source = null;
      this.pollTimer = null;
      this.retryTimer = null;
      this.graceTimer = null;
      this.retryMs = STREAM_RETRY_MIN_MS;
      this.ended = false;
      this.stopped = false;
      this.filling = false;
      this.plan = null; // the latest plan (GET /deploys/{id}/plan), once there is one
      this.planWanted = 0; // the version of the newest Planned event seen
      this.planLoaded = 0; // ... and of the one the shown plan answered
      this.planLoading = false;
      this.mayAct = null; // may approve/discard: null until the role is known
      this.roleAsked = false;
      this.workspaceShown = false;
      $("d-timeline").replaceChildren();
      $("d-log").replaceChildren();
      $("d-log-count").textContent = "";
      $("d-plan").hidden = true;
      $("d-plan-changes").replaceChildren();
      $("d-workspace").hidden = true;
      $("d-outputs").tBodies[0].replaceChildren();
      $("d-resources").replaceChildren();
      this.setMode("connecting");
    }

    get deploy() {
      return state.deploys.get(this.id);
    }

    start() {
      this.stopped = false;
      api(`/deploys/${encodeURIComponent(this.id)}`)
        .then((deploy) => {
          if (this.stopped) return;
          mergeDeploy(deploy);
          this.renderHead();
          renderList();
        })
        .catch((err) => {
          if (this.stopped || err.status === 401) return;
          if (err.status === 404) {
            notify("That deploy does not exist, or is not yours.", "error");
            closeDetail();
          }
        });
      this.openStream();
    }

    // -- the stream

    openStream() {
      if (this.stopped || this.source) return;
      if (!window.EventSource) {
        this.startPolling();
        return;
      }
      const url = `/deploys/${encodeURIComponent(this.id)}/stream?${tokenQuery()}`;
      const source = new EventSource(url);
      this.source = source;
      probe.eventSourcesOpened += 1;
      this.setMode("connecting");
      source.addEventListener("open", () => {
        if (this.source !== source) return;
        probe.streamOpens += 1;
        this.retryMs = STREAM_RETRY_MIN_MS;
        this.stopPolling();
        this.setMode("live");
      });
      const onEvent = (message) => this.onStreamEvent(message);
      for (const type of EVENT_TYPES) source.addEventListener(type, onEvent);
      source.addEventListener("message", onEvent); // an unnamed message, should one come
      source.addEventListener("log", (message) => this.onStreamLog(message));
      source.addEventListener("end", (message) => {
        try {
          const payload = JSON.parse(message.data);
          if (payload && payload.deploy) this.applyDeploy(payload.deploy);
        } catch (err) {
          /* an end without data is an end all the same */
        }
        this.onStreamEnd();
      });
      source.addEventListener("error", () => {
        if (this.source !== source) return;
        if (source.readyState === EventSource.CLOSED) {
          // An HTTP error or a non-SSE answer: EventSource will not retry. Poll meanwhile.
          this.source = null;
          this.setMode("polling");
          this.startPolling();
          this.scheduleStreamRetry();
        } else {
          this.setMode("reconnecting"); // EventSource reconnects with Last-Event-ID
        }
      });
    }

    closeStream() {
      if (this.source) this.source.close();
      this.source = null;
      clearTimeout(this.graceTimer);
      this.graceTimer = null;
    }

    scheduleStreamRetry() {
      clearTimeout(this.retryTimer);
      const deploy = this.deploy;
      if (this.stopped || (deploy && TERMINAL.has(deploy.status))) return;
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        const current = this.deploy;
        if (!this.stopped && !(current && TERMINAL.has(current.status))) this.openStream();
      }, this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, STREAM_RETRY_MAX_MS);
    }

    onStreamEvent(message) {
      let payload;
      try {
        payload = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      probe.sseEvents += 1;
      const event = payload && payload.event ? payload.event : payload;
      if (payload && payload.deploy) this.applyDeploy(payload.deploy);
      if (event && typeof event.version === "number") {
        if (event.version > this.maxVersion + 1 && this.maxVersion > 0) this.fillGap();
        this.addEvent(event);
      }
    }

    onStreamLog(message) {
      let line;
      try {
        line = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      probe.sseLogLines += 1;
      this.addLogLine(line);
    }

    onStreamEnd() {
      this.ended = true;
      this.closeStream();
      clearTimeout(this.retryTimer);
      this.setMode("ended");
    }

    applyDeploy(deploy) {
      const before = this.deploy;
      const merged = mergeDeploy(deploy);
      if (merged !== deploy) return;
      this.renderHead();
      renderList();
      const wasTerminal = before && TERMINAL.has(before.status);
      if (TERMINAL.has(deploy.status)) {
        // The server sends `end` after a terminal deploy's last message; should it not, stop
        // anyway after a grace period, so that EventSource does not reconnect forever.
        if (this.source && !this.graceTimer) {
          this.graceTimer = setTimeout(() => {
            this.graceTimer = null;
            const current = this.deploy;
            if (current && TERMINAL.has(current.status)) this.onStreamEnd();
          }, END_GRACE_MS);
        }
      } else if (wasTerminal) {
        this.ensureFollowing();
      }
    }

    /** A finished deploy that runs again (an admin's replay): follow it again. */
    ensureFollowing() {
      const deploy = this.deploy;
      if (this.stopped || !deploy || TERMINAL.has(deploy.status)) return;
      if (this.source || this.pollTimer || this.retryTimer) return;
      this.ended = false;
      clearTimeout(this.graceTimer);
      this.graceTimer = null;
      this.openStream();
    }

    async fillGap() {
      // An event type this page does not listen for went by: fetch what is missing.
      if (this.filling) return;
      this.filling = true;
      try {
        const page = await api(`/deploys/${encodeURIComponent(this.id)}/events?after=${this.maxVersion}`);
        for (const event of page.items || []) this.addEvent(event);
      } catch (err) {
        /* the next message or poll will do */
      } finally {
        this.filling = false;
      }
    }

    // -- polling, when the stream is unavailable

    startPolling() {
      if (this.pollTimer || this.stopped) return;
      const tick = async () => {
        if (this.stopped || this.source) {
          this.pollTimer = null;
          return;
        }
        let terminal = false;
        try {
          terminal = await this.pollOnce();
        } catch (err) {
          if (err.status === 401) return;
        }
        if (this.stopped || this.source) {
          this.pollTimer = null;
          return;
        }
        if (terminal) {
          this.pollTimer = null;
          this.setMode("ended");
          return;
        }
        this.pollTimer = setTimeout(tick, DETAIL_POLL_MS);
      };
      this.pollTimer = setTimeout(tick, 0);
    }

    stopPolling() {
      clearTimeout(this.pollTimer);
      this.pollTimer = null;
    }

    /** One round of polling; true once the deploy is terminal and everything is read. */
    async pollOnce() {
      const base = `/deploys/${encodeURIComponent(this.id)}`;
      const deploy = await api(base);
      this.applyDeploy(deploy);
      const page = await api(`${base}/events?after=${this.maxVersion}`);
      probe.eventPolls += 1;
      for (const event of page.items || []) this.addEvent(event);
      // Terraform output a page at a time: however long the log, each answer is bounded.
      for (;;) {
        const url = `${base}/logs?after=${this.lastSeq}&limit=${LOG_PAGE_LINES}`;
        const response = await api(url, { raw: true });
        probe.logPolls += 1;
        const text = await response.text();
        const last = Number.parseInt(response.headers.get("X-Last-Seq") || "", 10);
        if (!Number.isFinite(last) || last <= this.lastSeq) break;
        const lines = text.split("\n");
        const first = last - lines.length + 1;
        lines.forEach((line, i) => this.addLogLine({ seq: first + i, line, stream: "stdout" }));
        this.lastSeq = last;
        if (lines.length < LOG_PAGE_LINES) break;
      }
      return TERMINAL.has(deploy.status);
    }

    // -- rendering

    addEvent(event) {
      if (this.events.has(event.version)) return;
      this.events.set(event.version, event);
      if (event.type === "Planned" && event.version > this.planWanted) {
        this.planWanted = event.version;
        this.loadPlan();
      }
      const timeline = $("d-timeline");
      const item = timelineItem(event);
      if (event.version > this.maxVersion) {
        timeline.append(item);
        this.maxVersion = event.version;
      } else {
        const after = [...timeline.children].find((li) => Number(li.dataset.version) > event.version);
        timeline.insertBefore(item, after || null);
      }
    }

    addLogLine(entry) {
      const seq = Number(entry.seq);
      if (Number.isFinite(seq)) {
        if (seq <= this.lastSeq) return; // already shown (a replay after a reconnect)
        this.lastSeq = seq;
      }
      const log = $("d-log");
      const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 24;
      if (entry.attempt !== undefined && entry.attempt !== this.lastAttempt) {
        if (this.lastAttempt !== null || entry.attempt > 1) {
          log.append(el("span", { class: "log-attempt" }, `── attempt ${entry.attempt} ──\n`));
        }
        this.lastAttempt = entry.attempt;
      }
      const stream = entry.stream === "stderr" ? "stderr" : "stdout";
      log.append(el("span", { class: `log-line log-${stream}`, "data-seq": seq }, `${stripAnsi(entry.line)}\n`));
      this.logLines += 1;
      while (log.childNodes.length > MAX_LOG_LINES) log.firstChild.remove();
      $("d-log-count").textContent = `${this.logLines} line${this.logLines === 1 ? "" : "s"}`;
      if (stick) log.scrollTop = log.scrollHeight;
    }

    setMode(mode) {
      this.mode = mode;
      probe.detailMode = mode;
      const node = $("d-mode");
      node.dataset.mode = mode;
      node.textContent = {
        connecting: "connecting…",
        live: "● live",
        reconnecting: "reconnecting…",
        polling: "polling",
        ended: "final",
        idle: "",
      }[mode] || mode;
      node.title = {
        live: "Following the deploy's event stream",
        polling: "The live stream is unavailable: polling every second",
        reconnecting: "The connection dropped; resuming where it left off",
      }[mode] || "";
    }

    renderHead() {
      const deploy = this.deploy;
      if (!deploy) return;
      $("d-title").replaceChildren(
        el("span", { class: "d-ws" }, deploy.workspace),
        el("span", { class: `row-action action-${safeClass(deploy.action)}` }, deploy.action),
      );
      $("d-badge").replaceChildren(badge(deploy));
      const meta = [
        ["Deploy", el("code", { title: deploy.id }, deploy.id)],
        ["Attempt", `${deploy.attempt} of ${deploy.max_attempts}`],
        ["Owner", deploy.owner || "—"],
        ["Created", el("time", { datetime: deploy.created_at }, fmtTime(deploy.created_at))],
        ["Updated", el("time", { datetime: deploy.updated_at }, fmtTime(deploy.updated_at))],
        ["Took", TERMINAL.has(deploy.status) ? fmtDuration(deploy.created_at, deploy.updated_at) : "…"],
      ];
      if (deploy.state_version !== null && deploy.state_version !== undefined) {
        meta.push(["State", `version ${deploy.state_version}`]);
      }
      $("d-meta").replaceChildren(
        ...meta.map(([k, v]) => el("div", { class: "meta-item" }, el("dt", null, k), el("dd", null, v))),
      );
      const error = $("d-error");
      if (deploy.error && deploy.status !== "cancelled") {
        error.replaceChildren(
          el("strong", null, deploy.error.reason),
          deploy.error.message ? el("span", null, ` — ${deploy.error.message}`) : null,
        );
        error.hidden = false;
      } else {
        error.hidden = true;
        error.replaceChildren();
      }
      const cancel = $("d-cancel");
      cancel.hidden = TERMINAL.has(deploy.status);
      cancel.disabled = Boolean(deploy.cancel_requested);
      if (cancel.hidden || cancel.disabled) resetCancelButton();
      const replay = $("d-replay");
      replay.hidden = deploy.status !== "failed" || state.admin === false;
      this.renderPlanState();
      if (deploy.status === "succeeded" && deploy.action !== "plan") this.loadWorkspace();
    }

    // -- the plan

    async loadPlan() {
      if (this.planLoading || this.stopped) return;
      this.planLoading = true;
      try {
        while (this.planLoaded < this.planWanted && !this.stopped) {
          const wanted = this.planWanted;
          const plan = await api(`/deploys/${encodeURIComponent(this.id)}/plan`);
          if (this.stopped) return;
          this.plan = plan;
          this.planLoaded = wanted;
          this.renderPlan();
        }
      } catch (err) {
        /* 404 (no plan yet) or an outage: the next Planned event asks again */
      } finally {
        this.planLoading = false;
      }
      const deploy = this.deploy;
      if (deploy && deploy.status === "planned" && this.mayAct === null) this.resolveRole();
    }

    async resolveRole() {
      const deploy = this.deploy;
      if (!deploy || this.roleAsked) return;
      this.roleAsked = true;
      try {
        const role = await workspaceRole(deploy);
        this.mayAct = role === "owner" || role === "admin" || role === "deploy";
      } catch (err) {
        this.mayAct = true; // unknown: offer it, the server decides
      }
      if (!this.stopped) this.renderPlanState();
    }

    renderPlan() {
      const plan = this.plan;
      if (!plan) return;
      probe.planRenders = (probe.planRenders || 0) + 1;
      $("d-plan").hidden = false;
      $("d-plan").dataset.attempt = String(plan.attempt);
      $("d-plan-summary").replaceChildren(...summaryChips(plan.summary));
      $("d-plan-changes").replaceChildren(
        ...(plan.changes || []).map((change) => {
          const kind = changeKind(change.actions);
          const words = CHANGES[kind];
          return el(
            "li",
            { class: `pc pc-${kind}`, "data-action": kind, "data-address": change.address },
            changeSymbol(kind),
            el("code", { class: "pc-addr" }, change.address),
            el("span", { class: "pc-act" }, `${words.en} · `, el("span", { lang: "ko" }, words.ko)),
            change.tainted ? el("span", { class: "pc-note" }, "tainted · 손상됨") : null,
          );
        }),
      );
      this.renderPlanState();
    }

    /** What the plan's note and buttons say for the deploy's status now. */
    renderPlanState() {
      const deploy = this.deploy;
      const plan = this.plan;
      if (!deploy || !plan) return;
      let note;
      if (!plan.changed) note = "No changes: nothing to apply · 변경 사항 없음";
      else if (deploy.action === "plan") note = "A speculative plan: nothing is applied · 계획만";
      else if (deploy.status === "planned") note = "Waiting for approval · 승인 대기";
      else if (deploy.status === "discarded") note = "Discarded: nothing was applied · 폐기됨";
      else if (deploy.status === "succeeded") note = "Applied · 적용됨";
      else if (deploy.status === "cancelled") note = "Cancelled · 취소됨";
      else if (deploy.status === "failed") note = "Not applied in full · 적용 실패";
      else note = "Approved: applying · 승인됨";
      const node = $("d-plan-note");
      node.textContent = note;
      node.dataset.status = deploy.status;
      const actions = $("d-plan-actions");
      actions.hidden = !(deploy.status === "planned" && this.mayAct === true);
      if (deploy.status === "planned" && this.mayAct === null) this.resolveRole();
    }

    // -- the workspace's outputs and resources (a succeeded apply or destroy)

    async loadWorkspace() {
      if (this.workspaceShown || this.stopped) return;
      this.workspaceShown = true;
      const deploy = this.deploy;
      const ref = encodeURIComponent(workspaceRef(deploy));
      try {
        const [outputs, resources] = await Promise.all([
          api(`/workspaces/${ref}/outputs`),
          api(`/workspaces/${ref}/resources`),
        ]);
        if (this.stopped) return;
        this.renderWorkspace(deploy, outputs.outputs || {}, resources.items || []);
      } catch (err) {
        if (err.status === 404) {
          this.renderWorkspace(deploy, {}, [], "The workspace has no state.");
        } else {
          this.workspaceShown = false; // try again on the next render
        }
      }
    }

    renderWorkspace(deploy, outputs, resources, message) {
      $("d-workspace").hidden = false;
      const written = deploy.state_version !== null && deploy.state_version !== undefined
        ? ` · this deploy wrote version ${deploy.state_version}` : "";
      $("d-ws-note").textContent = message || `The latest state of ${workspaceRef(deploy)}${written}`;
      const rows = Object.entries(outputs).map(([name, output]) => {
        const type = typeof output.type === "string" ? output.type : JSON.stringify(output.type);
        const value = output.sensitive
          ? el("span", { class: "sensitive" }, "(sensitive · 민감)")
          : el("code", null, typeof output.value === "string" ? output.value : JSON.stringify(output.value));
        return el(
          "tr",
          { "data-output": name, "data-sensitive": output.sensitive ? "true" : "false" },
          el("th", { scope: "row" }, el("code", null, name)),
          el("td", null, type || ""),
          el("td", null, value),
        );
      });
      $("d-outputs").tBodies[0].replaceChildren(...rows);
      $("d-outputs").hidden = !rows.length;
      $("d-outputs-empty").hidden = Boolean(rows.length);
      $("d-resources").replaceChildren(
        ...resources.map((r) =>
          el(
            "li",
            { "data-address": r.address },
            el("code", null, r.address),
            el("span", { class: "muted" }, ` ${r.provider}`),
          ),
        ),
      );
      $("d-resources-empty").hidden = Boolean(resources.length);
    }

    stop() {
      this.stopped = true;
      this.closeStream();
      this.stopPolling();
      clearTimeout(this.retryTimer);
    }

    destroy() {
      this.stop();
      $("d-timeline").replaceChildren();
      $("d-log").replaceChildren();
    }
  }

  function timelineItem(event) {
    const { facts, message } = describeEvent(event);
    return el(
      "li",
      { class: `tl tl-${safeClass(event.type)}`, "data-version": event.version, "data-type": event.type },
      el("span", { class: "tl-dot", "aria-hidden": "true" }),
      el(
        "div",
        { class: "tl-body" },
        el(
          "div",
          { class: "tl-line" },
          el("span", { class: "tl-type" }, event.type),
          el("time", { datetime: event.recorded_at, title: event.recorded_at }, fmtTime(event.recorded_at)),
          el("span", { class: "tl-actor" }, event.actor),
        ),
        facts.length ? el("div", { class: "tl-facts" }, facts.map((f) => el("span", { class: "fact" }, f))) : null,
        message ? el("div", { class: "tl-message" }, message) : null,
      ),
    );
  }

  function describeEvent(event) {
    const d = event.data || {};
    const names = (obj) => Object.keys(obj || {}).join(", ");
    const facts = [];
    let message = "";
    switch (event.type) {
      case "Requested":
        facts.push(`${d.action} · ${d.workspace}`, `up to ${d.max_attempts} attempts`);
        if (names(d.files)) facts.push(`files: ${names(d.files)}`);
        if (names(d.variables)) facts.push(`variables: ${names(d.variables)}`);
        if (d.secret_names && d.secret_names.length) facts.push(`secrets: ${d.secret_names.join(", ")}`);
        break;
      case "Started":
        facts.push(`attempt ${d.attempt}`);
        if (d.step === "plan") facts.push("plan for approval");
        if (d.step === "apply") facts.push("apply the approved plan");
        if (d.runner) facts.push(`runner ${d.runner}`);
        if (d.worker) facts.push(`worker ${d.worker}`);
        break;
      case "Failed":
        facts.push(`attempt ${d.attempt}`, `reason: ${d.reason}`);
        if (d.exit_code !== null && d.exit_code !== undefined) facts.push(`exit code ${d.exit_code}`);
        facts.push(d.final ? "final" : "will retry");
        message = d.message || "";
        break;
      case "Retried":
        facts.push(`next: attempt ${d.attempt} of ${d.max_attempts}`, `by ${d.by}`);
        if (d.delay_seconds) facts.push(`after ${d.delay_seconds}s`);
        break;
      case "StatePersisted":
        facts.push(`state version ${d.state_version}`, `store ${d.store}`, `serial ${d.serial}`);
        break;
      case "Destroyed":
        facts.push(`attempt ${d.attempt}`, `reason: ${d.reason}`);
        message = d.message || "";
        break;
      case "StateRescued":
        facts.push(`attempt ${d.attempt}`, `copy at ${d.location}`);
        message = d.message || "";
        break;
      case "Succeeded":
        facts.push(`attempt ${d.attempt}`);
        break;
      case "CancelRequested":
        facts.push(`by ${d.by}`);
        break;
      case "Planned": {
        const s = d.summary || {};
        facts.push(`attempt ${d.attempt}`);
        facts.push(d.changed === false ? "no changes" : `+${s.add || 0} ~${s.change || 0} -${s.destroy || 0}`);
        if (d.awaits_approval) facts.push("waits for approval · 승인 대기");
        if (d.base_state_version !== null && d.base_state_version !== undefined) {
          facts.push(`against state version ${d.base_state_version}`);
        }
        break;
      }
      case "Approved":
        facts.push(`attempt ${d.attempt}`, `by ${d.by}`);
        if (d.rule === "within_approved") facts.push("within the approved changes");
        break;
      case "Discarded":
        facts.push(`by ${d.by}`, d.reason === "expired" ? "expired" : "discarded");
        break;
      case "Cancelled":
        facts.push(`by ${d.by}`);
        if (d.attempt !== null && d.attempt !== undefined) facts.push(`attempt ${d.attempt} stopped`);
        break;
      default: {
        const text = JSON.stringify(d);
        if (text && text !== "{}") message = text.length > 300 ? `${text.slice(0, 300)}…` : text;
      }
    }
    return { facts: facts.map(String), message: String(message) };
  }

  // ------------------------------------------------------------------ selection (#/deploys/<id>)

  function showDetailPane(show) {
    $("detail").hidden = !show;
    $("detail-placeholder").hidden = show;
  }

  function selectDeploy(id) {
    const hash = `#/deploys/${id}`;
    if (location.hash !== hash) location.hash = hash; // hashchange opens it
    else openDetail(id);
  }

  function openDetail(id) {
    if (state.detail && state.detail.id === id && !state.detail.stopped) return;
    if (state.detail) state.detail.destroy();
    resetCancelButton();
    state.detail = new DeployDetail(id);
    showDetailPane(true);
    state.detail.renderHead();
    renderList();
    state.detail.start();
    if (window.matchMedia("(max-width: 899px)").matches) {
      $("detail").scrollIntoView({ behavior: "smooth", block: "start" });
    }
  }

  function closeDetail() {
    if (state.detail) state.detail.destroy();
    state.detail = null;
    showDetailPane(false);
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
    renderList();
  }

  function routeFromHash() {
    const match = /^#\/deploys\/([0-9a-fA-F-]{8,64})$/.exec(location.hash);
    if (match && state.token) openDetail(match[1].toLowerCase());
    else if (!match && state.detail) closeDetail();
  }

  // ------------------------------------------------------------------ cancel and replay

  let cancelArmed = null;

  function resetCancelButton() {
    clearTimeout(cancelArmed);
    cancelArmed = null;
    const button = $("d-cancel");
    button.textContent = "Cancel";
    button.classList.remove("armed");
  }

  async function onCancel() {
    const detail = state.detail;
    if (!detail) return;
    const button = $("d-cancel");
    if (!cancelArmed) {
      // Two clicks: the first arms the button for a few seconds.
      button.textContent = "Confirm cancel";
      button.classList.add("armed");
      cancelArmed = setTimeout(resetCancelButton, 4000);
      return;
    }
    resetCancelButton();
    button.disabled = true;
    try {
      const deploy = await api(`/deploys/${encodeURIComponent(detail.id)}/cancel`, { method: "POST" });
      if (state.detail === detail) detail.applyDeploy(deploy);
      notify(
        deploy.status === "cancelled" ? "Deploy cancelled." : "Cancel requested: terraform is being stopped.",
        "ok",
      );
    } catch (err) {
      if (err.status !== 401) notify(`Could not cancel: ${err.detail || err.message}`, "error");
    } finally {
      if (state.detail === detail) detail.renderHead();
    }
  }

  async function onReplay() {
    const detail = state.detail;
    if (!detail) return;
    const button = $("d-replay");
    button.disabled = true;
    try {
      const deploy = await api(`/deploys/${encodeURIComponent(detail.id)}/replay`, { method: "POST" });
      state.admin = true;
      if (state.detail === detail) detail.applyDeploy(deploy);
      notify("Replay queued with a fresh attempt budget.", "ok");
      refreshListSoon();
    } catch (err) {
      if (err.status === 403) {
        state.admin = false;
        notify("Only an admin may replay a deploy; this token is not an admin's.", "error");
      } else if (err.status === 409) {
        notify(`Cannot replay: ${err.detail}`, "error");
      } else if (err.status !== 401) {
        notify(`Could not replay: ${err.detail || err.message}`, "error");
      }
    } finally {
      button.disabled = false;
      if (state.detail === detail) detail.renderHead();
      renderList();
    }
  }

  async function onPlanCommand(verb) {
    const detail = state.detail;
    if (!detail) return;
    const buttons = [$("d-approve"), $("d-discard")];
    for (const b of buttons) b.disabled = true;
    try {
      const deploy = await api(`/deploys/${encodeURIComponent(detail.id)}/${verb}`, {
        method: "POST",
        headers: { "Idempotency-Key": newIdempotencyKey() },
      });
      if (state.detail === detail) detail.applyDeploy(deploy);
      notify(
        verb === "approve"
          ? "Approved: the saved plan is being applied · 승인됨"
          : "Plan discarded: nothing is applied · 폐기됨",
        "ok",
      );
      refreshListSoon();
    } catch (err) {
      if (err.status === 403) {
        detail.mayAct = false;
        notify("Your role in this workspace does not allow approving or discarding.", "error");
      } else if (err.status === 409) {
        notify(`Cannot ${verb}: ${err.detail}`, "error");
      } else if (err.status !== 401) {
        notify(`Could not ${verb}: ${err.detail || err.message}`, "error");
      }
    } finally {
      for (const b of buttons) b.disabled = false;
      if (state.detail === detail) detail.renderHead();
    }
  }

  // ------------------------------------------------------------------ the deploy form

  let fileCounter = 0;

  function addFileRow(name = "", content = "") {
    fileCounter += 1;
    const id = `file-${fileCounter}`;
    const nameInput = el("input", {
      class: "file-name", value: name, placeholder: "file name, e.g. variables.tf",
      spellcheck: "false", "aria-label": "File name", id: `${id}-name`,
    });
    const textarea = el("textarea", {
      class: "file-content code", rows: name === "main.tf" ? 10 : 6, spellcheck: "false",
      "aria-label": "File content", id: `${id}-content`, placeholder: 'resource "terraform_data" "web" { … }',
    });
    textarea.value = content;
    nameInput.value = name;
    const remove = el("button", { type: "button", class: "btn btn-small btn-quiet", title: "Remove file" }, "Remove");
    const row = el("div", { class: "file-row" }, el("div", { class: "file-row-head" }, nameInput, remove), textarea);
    remove.addEventListener("click", () => row.remove());
    $("f-files").append(row);
    return row;
  }

  function addSecretRow() {
    const row = el(
      "div",
      { class: "secret-row" },
      el("input", { class: "secret-name", placeholder: "name (e.g. access_key)", spellcheck: "false", autocomplete: "off", "aria-label": "Secret name" }),
      el("input", { class: "secret-value", type: "password", placeholder: "value", autocomplete: "new-password", "aria-label": "Secret value" }),
    );
    const remove = el("button", { type: "button", class: "btn btn-small btn-quiet", title: "Remove secret" }, "✕");
    remove.addEventListener("click", () => row.remove());
    row.append(remove);
    $("f-secrets").append(row);
    return row;
  }

  function parsePairs(text, what) {
    const out = {};
    text.split(/\r?\n/).forEach((raw, i) => {
      const line = raw.trim();
      if (!line || line.startsWith("#")) return;
      const at = line.indexOf("=");
      if (at <= 0) throw new Error(`${what}, line ${i + 1}: expected key=value`);
      const key = line.slice(0, at).trim();
      if (Object.prototype.hasOwnProperty.call(out, key)) throw new Error(`${what}: ${key} given twice`);
      out[key] = line.slice(at + 1).trim();
    });
    return out;
  }

  function readForm() {
    const files = {};
    for (const row of $("f-files").querySelectorAll(".file-row")) {
      const name = row.querySelector(".file-name").value.trim();
      const content = row.querySelector(".file-content").value;
      if (!name && !content.trim()) continue;
      if (!name) throw new Error("Every file needs a name.");
      if (Object.prototype.hasOwnProperty.call(files, name)) throw new Error(`Two files are named ${name}.`);
      files[name] = content;
    }
    if (!Object.keys(files).length) throw new Error("Add at least one .tf file.");
    const secrets = {};
    for (const row of $("f-secrets").querySelectorAll(".secret-row")) {
      const name = row.querySelector(".secret-name").value.trim();
      const value = row.querySelector(".secret-value").value;
      if (!name && !value) continue;
      if (!name) throw new Error("Every secret needs a name.");
      secrets[name] = value;
    }
    const body = {
      workspace: $("f-workspace").value.trim() || "default",
      action: $("f-action").value,
      files,
    };
    if (body.action !== "plan" && !$("f-auto-approve").checked) body.auto_approve = false;
    const variables = parsePairs($("f-variables").value, "Variables");
    if (Object.keys(variables).length) body.variables = variables;
    if (Object.keys(secrets).length) body.secrets = secrets;
    const attempts = $("f-attempts").value.trim();
    if (attempts) {
      const n = Number(attempts);
      if (!Number.isInteger(n) || n < 1) throw new Error("Attempts must be a whole number, at least 1.");
      body.max_attempts = n;
    }
    return body;
  }

  function newIdempotencyKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function onSubmit(event) {
    event.preventDefault();
    const error = $("f-error");
    error.hidden = true;
    if (!state.token) {
      error.textContent = "Enter an API token first.";
      error.hidden = false;
      $("token-input").focus();
      return;
    }
    let body;
    try {
      body = readForm();
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      return;
    }
    const button = $("f-submit");
    button.disabled = true;
    button.textContent = "Submitting…";
    try {
      const deploy = await api("/deploys", {
        method: "POST",
        body,
        headers: { "Idempotency-Key": newIdempotencyKey() },
      });
      mergeDeploy(deploy);
      if (!state.order.includes(deploy.id)) state.order.unshift(deploy.id);
      // Secrets do not linger in the page once sent.
      for (const input of $("f-secrets").querySelectorAll(".secret-value")) input.value = "";
      selectDeploy(deploy.id);
      renderList();
    } catch (err) {
      if (err.status !== 401) {
        error.textContent = `The deploy was refused: ${err.detail || err.message}`;
        error.hidden = false;
      }
    } finally {
      button.disabled = false;
      syncFormMode();
    }
  }

  /** The submit button and the auto-approve box follow the action: a plan only is never
   *  applied; an apply or destroy without auto-approve stops at its plan for review. */
  function syncFormMode() {
    const plan = $("f-action").value === "plan";
    const box = $("f-auto-approve");
    box.disabled = plan;
    $("f-auto-approve-hint").textContent = plan
      ? "a plan only is never applied"
      : "unchecked: the plan waits for approval";
    const button = $("f-submit");
    if (button.disabled) return;
    button.textContent = plan ? "Plan" : box.checked ? "Deploy" : "Plan for review";
  }

  async function onPickFiles(event) {
    const input = event.target;
    for (const file of input.files) {
      if (file.size > 1024 * 1024) {
        notify(`${file.name} is larger than 1 MiB: not loaded.`, "error");
        continue;
      }
      const text = await file.text();
      // Replace an empty row of the same name (or the untouched first row) instead of adding.
      const existing = [...$("f-files").querySelectorAll(".file-row")].find((row) => {
        const name = row.querySelector(".file-name").value.trim();
        const content = row.querySelector(".file-content").value.trim();
        return name === file.name || (!content && (name === "" || name === "main.tf"));
      });
      if (existing) {
        existing.querySelector(".file-name").value = file.name;
        existing.querySelector(".file-content").value = text;
      } else {
        addFileRow(file.name, text);
      }
    }
    input.value = "";
  }

  // ------------------------------------------------------------------ start

  function legend() {
    const statuses = [
      { status: "queued", attempt: 1, max_attempts: 3 },
      { status: "deploying", attempt: 1, max_attempts: 3 },
      { status: "retrying", attempt: 2, max_attempts: 3 },
      { status: "failed", attempt: 3, max_attempts: 3 },
      { status: "succeeded", attempt: 1, max_attempts: 3 },
      { status: "cancelled", attempt: 1, max_attempts: 3 },
      { status: "planned", attempt: 1, max_attempts: 3 },
      { status: "discarded", attempt: 1, max_attempts: 3 },
    ];
    $("legend").replaceChildren(...statuses.map((d) => badge(d)));
  }

  function init() {
    legend();
    addFileRow("main.tf", "");
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token-input").value.trim();
      if (!value) return;
      $("token-input").value = "";
      $("token-input").placeholder = "token saved in this browser";
      setToken(value);
    });
    $("token-forget").addEventListener("click", () => {
      $("token-input").value = "";
      $("token-input").placeholder = "tfd_…";
      setToken("");
    });
    $("deploy-form").addEventListener("submit", onSubmit);
    $("f-add-file").addEventListener("click", () => addFileRow().querySelector(".file-name").focus());
    $("f-add-secret").addEventListener("click", () => addSecretRow().querySelector(".secret-name").focus());
    $("f-pick").addEventListener("change", onPickFiles);
    $("d-cancel").addEventListener("click", onCancel);
    $("d-replay").addEventListener("click", onReplay);
    $("d-approve").addEventListener("click", () => onPlanCommand("approve"));
    $("d-discard").addEventListener("click", () => onPlanCommand("discard"));
    $("f-action").addEventListener("change", syncFormMode);
    $("f-auto-approve").addEventListener("change", syncFormMode);
    syncFormMode();
    $("d-close").addEventListener("click", closeDetail);
    $("list-refresh").addEventListener("click", () => refreshList());
    window.addEventListener("hashchange", routeFromHash);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && state.token) refreshList();
    });
    window.addEventListener("storage", (event) => {
      // Another tab set or forgot the token.
      if (event.key === TOKEN_KEY && (event.newValue || "") !== state.token) {
        state.token = event.newValue || "";
        resetSession();
      }
    });

    state.token = localStorage.getItem(TOKEN_KEY) || "";
    if (state.token) $("token-input").placeholder = "token saved in this browser";
    resetSession();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
