// Muster Cloud UI: what every page shares. The JSON API client (session cookie + CSRF header),
// DOM building that never parses data as HTML, keyed list updates that keep focus, polling,
// formatting, the confirmation dialog and the toast.
"use strict";

const Muster = (() => {
  const API = "/api/v1";
  const POLL_MS = 2000;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";
  const canWrite = document.body.dataset.canWrite === "true";
  const canManageDeployments = document.body.dataset.canManageDeployments === "true";

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function loginAgain() {
    const next = location.pathname + location.search;
    location.assign("/ui/login?expired=1&next=" + encodeURIComponent(next));
  }

  // One call of the platform API. Writes carry the session's CSRF token; the cookie is sent by
  // the browser (same origin only). Throws ApiError with the API's own code and message.
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(API + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "same-origin",
        cache: "no-store",
      });
    } catch (_err) {
      throw new ApiError(0, "network",
        "The coordinator did not answer. Check that it is running; this page keeps retrying.");
    }
    if (response.status === 401) {
      loginAgain();
      throw new ApiError(401, "root.unauthenticated", "Your session has ended; log in again.");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_err) {
      data = null;
    }
    if (!response.ok) {
      const first = data && Array.isArray(data.errors) ? data.errors[0] : null;
      throw new ApiError(
        response.status,
        first ? first.code : "http." + response.status,
        first ? first.message : "The coordinator answered " + response.status + ".",
      );
    }
    return data;
  }

  // h("tr", {class: "x", dataset: {id: 1}, onclick: fn}, child, "text", [more]) -> Element.
  // Text always goes in as text nodes, never as markup.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    return append(el, ...children);
  }

  function append(el, ...children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  // Replace el's children (used for small cells that hold no focusable control).
  function fill(el, ...children) {
    el.replaceChildren();
    return append(el, ...children);
  }

  // Make `container`'s children match `items`, one element per key, reusing the existing
  // element of each key (so focus and open menus survive a refresh) and keeping the order.
  function sync(container, items, keyOf, create, update) {
    const existing = new Map();
    for (const child of Array.from(container.children)) {
      if (child.dataset.key !== undefined) existing.set(child.dataset.key, child);
      else child.remove();
    }
    let previous = null;
    for (const item of items) {
      const key = String(keyOf(item));
      let el = existing.get(key);
      if (el) existing.delete(key);
      else {
        el = create(item);
        el.dataset.key = key;
      }
      update(el, item);
      const wanted = previous ? previous.nextSibling : container.firstChild;
      if (wanted !== el) container.insertBefore(el, wanted);
      previous = el;
    }
    for (const el of existing.values()) el.remove();
  }

  function showError(message) {
    const banner = document.getElementById("page-error");
    if (!banner) return;
    if (!message) {
      banner.hidden = true;
      banner.textContent = "";
    } else if (banner.textContent !== message) {
      banner.textContent = message;
      banner.hidden = false;
    }
  }

  // Run `load` now and every POLL_MS while the tab is visible. Returns a function that runs it
  // at once (after an action). Errors go to the page's alert banner, and clear on success.
  function poll(load) {
    let timer = null;
    let running = false;
    const stamp = document.getElementById("updated-at");
    async function tick() {
      clearTimeout(timer);
      if (running) return;
      running = true;
      try {
        await load();
        showError(null);
        if (stamp) stamp.textContent = "updated " + new Date().toLocaleTimeString();
      } catch (err) {
        if (err.status !== 401) showError(err.message);
      } finally {
        running = false;
        for (const busy of document.querySelectorAll("[aria-busy=true]:not(button)")) {
          busy.setAttribute("aria-busy", "false");
        }
        if (!document.hidden) timer = setTimeout(tick, POLL_MS);
      }
    }
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) tick();
    });
    tick();
    return tick;
  }

  // ---- formatting -------------------------------------------------------------------------------
  // Memory always in GB, as ECE's console shows it: one unit on every page, so figures compare
  // at a glance (0.25 GB, 2 GB, 12.5 GB, 100 GB). Two decimals under 10 GB: instance sizes go
  // in steps of 128 MB, and a 256 MB instance must not read as 0.3 GB.
  function memory(mb) {
    if (mb === null || mb === undefined) return "–";
    const gb = mb / 1024;
    if (gb > 0 && gb < 0.01) return "< 0.01 GB";
    const places = gb >= 100 ? 1 : gb >= 10 ? 10 : 100;
    return Math.round(gb * places) / places + " GB";
  }

  // Local time as 2026-11-28 14:05:09 UTC+01:00: short, sortable, the same in every locale,
  // and saying which zone it is in (the coordinator's logs and the API speak UTC).
  function dateTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    const p = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
      p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds()) + " " + zone(d);
  }

  function zone(d) {
    const offset = -d.getTimezoneOffset();
    if (offset === 0) return "UTC";
    const p = (n) => String(n).padStart(2, "0");
    const a = Math.abs(offset);
    return "UTC" + (offset > 0 ? "+" : "-") + p(Math.floor(a / 60)) + ":" + p(a % 60);
  }

  // An id or a kind (10.0.0.1, 7a4db5a0-..., runner.certificate_renewed) that may wrap only after
  // its separators, never in the middle of a part.
  function breakable(text) {
    const parts = String(text).split(/(?<=[._:\-\/])/);
    const out = [];
    parts.forEach((part, i) => {
      if (i) out.push(document.createElement("wbr"));
      out.push(part);
    });
    return out;
  }

  function ago(iso) {
    if (!iso) return "never";
    const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " d ago";
  }

  function until(iso) {
    if (!iso) return "never";
    const s = Math.round((new Date(iso).getTime() - Date.now()) / 1000);
    if (s <= 0) return "expired";
    if (s < 3600) return "in " + Math.max(1, Math.round(s / 60)) + " min";
    if (s < 86400) return "in " + Math.round(s / 3600) + " h";
    return "in " + Math.round(s / 86400) + " d";
  }

  function time(iso, render) {
    return h("time", { datetime: iso || "", title: iso ? dateTime(iso) : null,
      text: (render || ago)(iso) });
  }

  // ---- small components -----------------------------------------------------------------------
  function badge(kind, text) {
    return h("span", { class: "badge badge-" + kind, text });
  }

  function connection(connected) {
    return connected
      ? h("span", { class: "badge badge-ok status-connected" }, h("span", { class: "dot", "aria-hidden": "true" }), "Connected")
      : h("span", { class: "badge badge-danger status-disconnected" }, h("span", { class: "dot", "aria-hidden": "true" }), "Disconnected");
  }

  function chips(values, kind) {
    if (!values.length) return h("span", { class: "muted", text: "none" });
    return h("span", { class: "chips" }, values.map((v) => h("span", { class: "chip " + (kind || ""), text: v })));
  }

  // A horizontal bar: used of total (MB). role=img with a text alternative.
  function capacityBar(used, total) {
    const pct = total > 0 ? Math.min(100, (used / total) * 100) : 0;
    const fillEl = h("span", { class: "bar-fill" });
    fillEl.style.width = pct.toFixed(1) + "%";
    const label = memory(used) + " of " + memory(total) + " used";
    return h("span", { class: "capacity" },
      h("span", { class: "bar", role: "img", "aria-label": label }, fillEl),
      h("span", { class: "bar-text", text: memory(used) + " / " + memory(total) }));
  }

  function empty(title, text, action) {
    return [h("p", { class: "empty-title", text: title }), h("p", { class: "muted", text }), action || null];
  }

  let toastTimer = null;
  function toast(message) {
    const el = document.getElementById("toast");
    el.textContent = message;
    el.classList.add("show");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => el.classList.remove("show"), 4000);
  }

  // A modal confirmation; resolves true when confirmed. Esc or Cancel resolve false.
  function confirm({ title, message, confirmLabel, danger = true }) {
    const dialog = document.getElementById("confirm-dialog");
    dialog.querySelector("#confirm-title").textContent = title;
    dialog.querySelector("#confirm-message").textContent = message;
    const ok = dialog.querySelector("#confirm-ok");
    ok.textContent = confirmLabel || "Confirm";
    ok.className = "btn " + (danger ? "btn-danger" : "btn-primary");
    dialog.returnValue = "cancel";
    const opener = document.activeElement;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        if (opener && document.contains(opener)) opener.focus();
        resolve(dialog.returnValue === "confirm");
      }, { once: true });
      dialog.showModal();
      dialog.querySelector("#confirm-cancel").focus();
    });
  }

  async function copy(text, button) {
    let done = false;
    try {
      await navigator.clipboard.writeText(text);
      done = true;
    } catch (_err) {
      done = false;
    }
    const label = button.querySelector("span") || button;
    const before = label.textContent;
    label.textContent = done ? "Copied" : "Select and copy";
    toast(done ? "Copied to the clipboard." : "The browser refused the clipboard: select the text and copy it.");
    setTimeout(() => { label.textContent = before; }, 2000);
  }

  // A button that runs `action` once at a time and reports failures in the banner. It is marked
  // busy rather than disabled, so keyboard focus stays on it (and returns to it after a dialog).
  function actionButton(attrs, label, action) {
    const button = h("button", Object.assign({ type: "button", class: "btn btn-small" }, attrs), label);
    button.addEventListener("click", async () => {
      if (button.getAttribute("aria-busy") === "true") return;
      button.setAttribute("aria-busy", "true");
      try {
        await action(button);
      } catch (err) {
        showError(err.message);
      } finally {
        button.removeAttribute("aria-busy");
      }
    });
    return button;
  }

  return {
    api, ApiError, h, append, fill, sync, poll, showError, memory, dateTime, ago, until, time,
    breakable,
    badge, connection, chips, capacityBar, empty, toast, confirm, copy, actionButton, canWrite, canManageDeployments,
  };
})();
