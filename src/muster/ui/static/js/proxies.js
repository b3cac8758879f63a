// Proxies page: every host with the proxy role, its connection, whether its proxy process runs,
// the routing table version it serves and how many backends that table routes to.
"use strict";

(() => {
  const { api, h, fill, sync, poll, time, connection, badge, breakable } = Muster;
  const PATH = "/platform/infrastructure/proxies";
  const tbody = document.getElementById("proxies");
  const emptyEl = document.getElementById("proxies-empty");
  const table = document.getElementById("proxies-table");
  const summary = document.getElementById("summary");

  // The proxy process as the host last reported it; none reported: unknown.
  function processBadge(p) {
    const process = p.proxy_process;
    if (!process) return badge("neutral process-unknown", "Unknown");
    return process.running ? badge("ok process-up", "Up") : badge("danger process-down", "Down");
  }

  function createRow() {
    return h("tr", {},
      h("td", { "data-label": "Proxy" }, h("span", { class: "mono strong proxy-id" }), h("span", { class: "sub mono proxy-ip" })),
      h("td", { "data-label": "Zone", class: "nowrap proxy-zone" }),
      h("td", { "data-label": "Connection", class: "proxy-host" }),
      h("td", { "data-label": "Proxy process", class: "proxy-process" }),
      h("td", { "data-label": "Routes version", class: "mono proxy-routes" }),
      h("td", { "data-label": "Backends", class: "proxy-backends" }),
      h("td", { "data-label": "Last heartbeat", class: "nowrap" }));
  }

  function updateRow(row, p) {
    const [id, zone, host, process, routes, backends, seen] = row.children;
    const report = p.proxy_process || {};
    fill(id.querySelector(".proxy-id"), breakable(p.proxy_id));
    id.querySelector(".proxy-ip").textContent = p.host_ip === p.proxy_id ? "" : p.host_ip;
    zone.textContent = p.zone || "–";
    fill(host, connection(p.connected));
    fill(process, processBadge(p), report.error ? h("span", { class: "sub proxy-error", text: report.error }) : null);
    routes.textContent = report.routes_version || "–";
    routes.title = report.routes_version ? "Routing table version " + report.routes_version : "No routing table served yet";
    backends.textContent = report.backends === undefined ? "–" : String(report.backends);
    fill(seen, time(p.last_heartbeat));
    row.classList.toggle("row-muted", !p.healthy);
  }

  async function load() {
    const proxies = (await api("GET", PATH)).proxies;
    const healthy = proxies.filter((p) => p.healthy).length;
    const text = proxies.length + (proxies.length === 1 ? " proxy" : " proxies") + " · " + healthy + " healthy · " + (proxies.length - healthy) + " not healthy";
    if (summary.textContent !== text) summary.textContent = text;
    table.hidden = !proxies.length;
    emptyEl.hidden = !!proxies.length;
    if (!proxies.length && !emptyEl.childElementCount) {
      fill(emptyEl,
        h("p", { class: "empty-title", text: "No proxies" }),
        h("p", { class: "muted", text: "Give a host the proxy role (Hosts page, Change roles) or join one with a roles token that grants it." }));
    }
    sync(tbody, proxies, (p) => p.proxy_id, createRow, updateRow);
  }

  poll(load);
})();
