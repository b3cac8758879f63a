// Audit log page: events newest first, filtered by kind, paged; the first page stays live.
"use strict";

(() => {
  const { api, h, fill, sync, poll, dateTime, ago, badge, breakable } = Muster;
  const PATH = "/platform/audit";
  const SIZE = 50;
  const kinds = JSON.parse(document.body.dataset.kinds || "[]");
  const select = document.getElementById("kind");
  const tbody = document.getElementById("events");
  const table = document.getElementById("audit-table");
  const emptyEl = document.getElementById("events-empty");
  const summary = document.getElementById("summary");
  const newer = document.getElementById("newer");
  const older = document.getElementById("older");
  const pageInfo = document.getElementById("page-info");
  const params = new URLSearchParams(location.search);
  let kind = kinds.includes(params.get("kind")) ? params.get("kind") : "";
  let from = 0;
  let total = 0;
  let refresh = () => {};

  const LABELS = {
    "token.created": "Token created", "token.used": "Token used", "token.refused": "Join refused",
    "token.revoked": "Token revoked", "api_key.created": "API key created", "api_key.deleted": "API key deleted",
    "login.succeeded": "Signed in", "login.failed": "Sign-in failed", "runner.joined": "Host joined",
    "runner.deleted": "Host deleted", "runner.roles_changed": "Roles changed",
    "allocator.maintenance": "Maintenance", "session.refreshed": "Session refreshed",
    "session.ended": "Signed out", "user.created": "User created", "user.updated": "User changed",
    "user.deleted": "User deleted", "user.password_changed": "Password changed",
    "signing_key.rotated": "Signing key rotated",
    "signing_key.retired": "Signing key retired", "ca.rotated": "CA rotated", "ca.retired": "CA retired",
    "server_certificate.rotated": "Server certificate rotated",
    "platform.deployment_domain_changed": "Deployment domain changed",
    "tls.certificate_issued": "TLS certificate issued", "tls.certificate_installed": "TLS certificate installed",
  };
  for (const k of kinds) select.append(h("option", { value: k, text: (LABELS[k] || k) + " (" + k + ")" }));
  select.value = kind;
  select.addEventListener("change", () => {
    kind = select.value;
    from = 0;
    const url = new URL(location.href);
    if (kind) url.searchParams.set("kind", kind);
    else url.searchParams.delete("kind");
    history.replaceState(null, "", url);
    refresh();
  });
  newer.addEventListener("click", () => { from = Math.max(0, from - SIZE); refresh(); });
  older.addEventListener("click", () => { from += SIZE; refresh(); });
  document.getElementById("filter").addEventListener("submit", (e) => e.preventDefault());

  function detailText(detail) {
    return Object.entries(detail || {}).map(([k, v]) =>
      k + "=" + (Array.isArray(v) ? v.join(", ") || "none" : v === null || v === "" ? "none" : typeof v === "object" ? JSON.stringify(v) : String(v)));
  }

  function createRow() {
    return h("tr", {},
      h("td", { "data-label": "Time" }), h("td", { "data-label": "Event" }), h("td", { "data-label": "Actor", class: "mono" }),
      h("td", { "data-label": "Source", class: "mono" }), h("td", { "data-label": "Subject" }),
      h("td", { "data-label": "Outcome" }), h("td", { "data-label": "Detail", class: "detail" }));
  }

  function updateRow(row, e) {
    if (row.dataset.filled) return;  // events never change
    row.dataset.filled = "1";
    const [at, event, actor, source, subject, outcome, detail] = row.children;
    const [day, clock, tz] = dateTime(e.at).split(" ");
    fill(at, h("time", { datetime: e.at, title: ago(e.at), class: "strong", text: clock + " " + tz }),
      h("span", { class: "sub", text: day }));
    fill(event, h("span", { class: "strong", text: LABELS[e.kind] || e.kind }), h("span", { class: "sub mono event-kind" }, breakable(e.kind)));
    actor.textContent = e.actor || "–";
    source.textContent = e.source || "–";
    fill(subject,
      e.runner_id ? h("span", { class: "sub-line" }, "host ", h("span", { class: "mono" }, breakable(e.runner_id))) : null,
      e.token_id ? h("span", { class: "sub-line" }, "token ",
        h("span", { class: "mono", title: e.token_id, text: e.token_id.slice(0, 8) + "…" })) : null,
      !e.runner_id && !e.token_id ? "–" : null);
    fill(outcome, e.outcome === "success" ? badge("ok", "success")
      : [badge("danger", "refused"), h("span", { class: "sub mono", text: e.outcome })]);
    const parts = detailText(e.detail);
    fill(detail, parts.length ? parts.map((p) => h("span", { class: "kv mono", text: p })) : "–");
  }

  async function load() {
    const query = new URLSearchParams({ from: String(from), size: String(SIZE) });
    if (kind) query.set("kind", kind);
    let page;
    try {
      page = await api("GET", PATH + "?" + query);
    } catch (err) {
      if (err.status === 403) {
        table.hidden = true;
        emptyEl.hidden = false;
        fill(emptyEl, h("p", { class: "empty-title", text: "The audit log is open to the admin user only" }),
          h("p", { class: "muted", text: "The coordinator refused to show it to this user (" + err.code + "). Log out and log in as admin to read it." }));
        document.querySelector(".pager").hidden = true;
        return;
      }
      throw err;
    }
    total = page.total;
    const events = page.events;
    const text = total + (total === 1 ? " event" : " events") + (kind ? " of this kind" : "");
    if (summary.textContent !== text) summary.textContent = text;
    table.hidden = !events.length;
    emptyEl.hidden = !!events.length;
    if (!events.length) {
      fill(emptyEl, h("p", { class: "empty-title", text: kind ? "No events of this kind yet" : "No events yet" }),
        h("p", { class: "muted", text: kind ? "Choose All kinds to see every event." : "Events appear here as tokens are created and hosts join." }));
    }
    sync(tbody, events, (e) => e.id, createRow, updateRow);
    newer.disabled = from === 0;
    older.disabled = from + SIZE >= total;
    pageInfo.textContent = events.length ? (from + 1) + "–" + (from + events.length) + " of " + total : "";
  }

  refresh = poll(load);
})();
