// Allocators page: allocators grouped by zone, filtered with the API's `q`, maintenance mode.
"use strict";

(() => {
  const { api, h, fill, sync, poll, memory, time, connection, badge, chips, capacityBar,
    actionButton, toast, canWrite, breakable } = Muster;
  const PATH = "/platform/infrastructure/allocators";
  const form = document.getElementById("filter");
  const input = document.getElementById("q");
  const qError = document.getElementById("q-error");
  const zonesEl = document.getElementById("zones");
  const summary = document.getElementById("summary");
  let query = new URLSearchParams(location.search).get("q") || "";
  input.value = query;
  let refresh = () => {};

  function setQuery(value) {
    query = value.trim();
    const url = new URL(location.href);
    if (query) url.searchParams.set("q", query);
    else url.searchParams.delete("q");
    history.replaceState(null, "", url);
    refresh();
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setQuery(input.value);
  });
  document.getElementById("q-clear").addEventListener("click", () => {
    input.value = "";
    setQuery("");
    input.focus();
  });

  async function setMaintenance(allocator, on) {
    const action = on ? "_start" : "_stop";
    await api("POST", PATH + "/" + encodeURIComponent(allocator.allocator_id) + "/maintenance-mode/" + action);
    toast((on ? "Maintenance mode started on " : "Maintenance mode stopped on ") + allocator.allocator_id + ".");
    refresh();
  }

  function createRow(a) {
    const cells = {
      id: h("td", { "data-label": "Allocator" }, h("a", { class: "mono strong", href: "/ui/allocators/" + encodeURIComponent(a.allocator_id) })),
      ip: h("td", { "data-label": "Host IP", class: "mono" }),
      capacity: h("td", { "data-label": "Memory" }),
      status: h("td", { "data-label": "Status" }),
      tags: h("td", { "data-label": "Tags" }),
      seen: h("td", { "data-label": "Last heartbeat", class: "nowrap" }),
    };
    const row = h("tr", {}, Object.values(cells));
    if (canWrite) {
      const button = actionButton({ class: "btn btn-small maintenance-toggle" }, "", async () => {
        const state = row._allocator;
        await setMaintenance(state, !state.status.maintenance_mode);
      });
      row.append(h("td", { class: "actions", "data-label": "Actions" }, button));
    }
    return row;
  }

  function updateRow(row, a) {
    row._allocator = a;
    const [id, ip, capacity, status, tags, seen] = row.children;
    fill(id.firstChild, breakable(a.allocator_id));
    ip.textContent = a.host_ip || "–";
    fill(capacity, capacityBar(a.capacity.memory.used, a.capacity.memory.total));
    fill(status, h("span", { class: "badges" }, connection(a.status.connected),
      a.status.maintenance_mode ? badge("warning status-maintenance", "Maintenance") : null,
      a.status.healthy ? null : badge("danger", "Unhealthy")));
    fill(tags, chips(a.metadata.map((m) => m.key + ": " + m.value), "chip-tag"));
    fill(seen, time(a.last_heartbeat));
    row.classList.toggle("row-muted", !a.status.connected);
    if (canWrite) {
      const button = row.querySelector(".maintenance-toggle");
      const label = a.status.maintenance_mode ? "Stop maintenance" : "Start maintenance";
      if (button.textContent !== label) button.textContent = label;
      button.setAttribute("aria-label", label + " on " + a.allocator_id);
    }
  }

  function createZone(zone) {
    const headers = ["Allocator", "Host IP", "Memory", "Status", "Tags", "Last heartbeat"];
    const head = h("tr", {}, headers.map((t) => h("th", { scope: "col", text: t })),
      canWrite ? h("th", { scope: "col" }, h("span", { class: "visually-hidden", text: "Actions" })) : null);
    const title = "zone-" + zone.zone_id.replace(/[^A-Za-z0-9_-]/g, "_");
    return h("section", { class: "card table-card zone-section", "aria-labelledby": title },
      h("div", { class: "card-head" },
        h("h2", { id: title, text: zone.zone_id }), h("span", { class: "muted zone-count" })),
      h("table", { class: "table responsive alloc-table" }, h("thead", {}, head), h("tbody")));
  }

  function updateZone(section, zone) {
    const up = zone.allocators.filter((a) => a.status.connected).length;
    let total = 0;
    for (const a of zone.allocators) total += a.capacity.memory.total;
    section.querySelector(".zone-count").textContent = zone.allocators.length +
      (zone.allocators.length === 1 ? " allocator" : " allocators") + " · " + up + " connected · " + memory(total);
    sync(section.querySelector("tbody"), zone.allocators, (a) => a.allocator_id, createRow, updateRow);
  }

  function renderEmpty() {
    zonesEl.dataset.state = "empty";
    const box = h("div", { class: "card empty" });
    if (query) {
      Muster.append(box,
        h("p", { class: "empty-title", text: "No allocator matches this filter" }),
        h("p", { class: "muted", text: "Check the query, or clear the filter to see every allocator." }),
        h("button", { type: "button", class: "btn", text: "Clear the filter", onclick: () => { input.value = ""; setQuery(""); } }));
    } else {
      Muster.append(box,
        h("p", { class: "empty-title", text: "No allocators yet" }),
        h("p", { class: "muted", text: "Create a roles token with the allocator role and run the install command it shows on each host; allocators appear here within seconds." }),
        canWrite ? h("a", { class: "btn btn-primary", href: "/ui/tokens#create", text: "Create a roles token" }) : null);
    }
    fill(zonesEl, box);
  }

  async function load() {
    const params = new URLSearchParams({ size: "10000" });
    if (query) params.set("q", query);
    let overview;
    try {
      overview = await api("GET", PATH + "?" + params);
      qError.hidden = true;
      input.removeAttribute("aria-invalid");
    } catch (err) {
      if (err.status === 400) {
        qError.textContent = err.message + ". Fix the query and apply it again.";
        qError.hidden = false;
        input.setAttribute("aria-invalid", "true");
        // No results for a query that was refused: the last good filter's list must not
        // stay on screen as if it answered this one.
        zonesEl.replaceChildren();
        zonesEl.dataset.state = "refused";
        summary.textContent = "No allocators shown: the filter is not valid";
        return;
      }
      throw err;
    }
    const zones = overview.zones;
    const count = zones.reduce((n, z) => n + z.allocators.length, 0);
    const text = count + (count === 1 ? " allocator" : " allocators") + " in " + zones.length +
      (zones.length === 1 ? " zone" : " zones") + (query ? " match the filter" : "");
    if (summary.textContent !== text) summary.textContent = text;
    if (!count) {
      renderEmpty();
      return;
    }
    if (zonesEl.dataset.state !== "zones") zonesEl.replaceChildren();
    zonesEl.dataset.state = "zones";
    sync(zonesEl, zones, (z) => z.zone_id, createZone, updateZone);
  }

  refresh = poll(load);
})();
