// Allocator detail page: capacity, host facts, health checks, metadata, instances, maintenance.
"use strict";

(() => {
  const { api, h, fill, poll, memory, time, dateTime, connection, badge, capacityBar,
    actionButton, toast, canWrite } = Muster;
  const id = document.body.dataset.allocatorId;
  const PATH = "/platform/infrastructure/allocators/" + encodeURIComponent(id);
  const actions = document.getElementById("actions");
  let current = null;
  let refresh = () => {};

  const CHECK_NAMES = {
    is_docker_healthy: "Host reports healthy",
    is_connected_to_zk: "Heartbeats reach the coordinator",
    has_instances: "Holds instances",
    storage_writable: "Host storage is writable",
  };

  let toggle = null;
  if (canWrite) {
    toggle = actionButton({ class: "btn", id: "maintenance-toggle" }, "Start maintenance", async () => {
      const on = !current.status.maintenance_mode;
      await api("POST", PATH + "/maintenance-mode/" + (on ? "_start" : "_stop"));
      toast(on ? "Maintenance mode started: no new instances will be placed here." : "Maintenance mode stopped.");
      refresh();
    });
    actions.append(toggle);
  }

  function fact(term, value) {
    return [h("dt", { text: term }), h("dd", {}, value)];
  }

  // Instances are placed only on connected allocators out of maintenance.
  function placement(status) {
    if (status.maintenance_mode) return badge("warning status-maintenance", "Maintenance");
    if (!status.connected) return badge("neutral status-not-accepting", "Not accepting instances");
    return badge("neutral status-accepting", "Accepting instances");
  }

  // ECE's `healthy` holds for a disconnected allocator without instances ("connected, or holds
  // no instances"): nothing is at risk, but the host's own health is not known then.
  function health(status) {
    if (!status.healthy) return badge("danger", "Unhealthy");
    if (!status.connected) return badge("neutral status-health-unknown", "Health unknown");
    return badge("ok", "Healthy");
  }

  function maintenanceSince(status) {
    const at = status.maintenance_mode_timestamp;
    const state = status.maintenance_mode ? "On" : "Off";
    return at ? [state + " since ", dateTime(at)] : state;
  }

  function render(a) {
    current = a;
    fill(document.getElementById("badges"), h("span", { class: "badges" },
      connection(a.status.connected),
      placement(a.status),
      health(a.status),
      h("span", { class: "muted", text: "zone " + a.zone_id })));
    if (toggle) {
      const label = a.status.maintenance_mode ? "Stop maintenance" : "Start maintenance";
      if (toggle.textContent !== label) toggle.textContent = label;
      toggle.className = "btn " + (a.status.maintenance_mode ? "btn-primary" : "");
    }
    const mem = a.capacity.memory;
    const override = a.settings && typeof a.settings.capacity === "number";
    fill(document.getElementById("capacity"),
      h("div", { class: "capacity-big" }, capacityBar(mem.used, mem.total)),
      h("dl", { class: "facts" },
        fact("Memory", memory(mem.total) + (override ? " (set in the allocator's settings)" : "")),
        fact("Used by instances", memory(mem.used)),
        fact("Free", memory(Math.max(0, mem.total - mem.used))),
        fact("Storage", memory(a.capacity.storage.total)),
        fact("CPUs", a.capacity.available_cpus === undefined ? "–" : String(a.capacity.available_cpus))));
    fill(document.getElementById("host"),
      fact("Runner", h("a", { class: "mono", href: "/ui/runners", text: a.allocator_id })),
      fact("Host IP", h("span", { class: "mono", text: a.host_ip || "–" })),
      fact("Public hostname", a.public_hostname || "–"),
      fact("Zone", a.zone_id),
      fact("Last heartbeat", a.last_heartbeat ? [time(a.last_heartbeat), " · ", dateTime(a.last_heartbeat)] : "never"),
      fact("Version", (a.build_info && a.build_info.version) || "–"),
      fact("Maintenance", maintenanceSince(a.status)));
    const checks = Object.entries(a.status.health_checks || {});
    fill(document.getElementById("checks"), checks.length ? checks.map(([name, ok]) => {
      // has_instances is information, not a pass/fail check.
      const neutral = name === "has_instances";
      return h("li", { class: "check-item " + (neutral ? "info" : ok ? "pass" : "fail") },
        h("span", { class: "check-icon", "aria-hidden": "true", text: neutral ? "•" : ok ? "✓" : "✕" }),
        h("span", { text: CHECK_NAMES[name] || name }),
        h("span", { class: "visually-hidden", text: neutral ? (ok ? ": yes" : ": no") : ok ? ": passing" : ": failing" }),
        neutral ? h("span", { class: "muted check-value", text: ok ? "yes" : "no" }) : null);
    }) : h("li", { class: "muted", text: "The host has not reported health checks yet." }));
    fill(document.getElementById("metadata"), a.metadata.length
      ? h("table", { class: "table compact" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Key" }), h("th", { scope: "col", text: "Value" }))),
        h("tbody", {}, a.metadata.map((m) => h("tr", {}, h("td", { class: "mono", text: m.key }), h("td", { text: m.value })))))
      : h("p", { class: "muted", text: "No metadata. Tags given at install (--allocator-tags) and items set through the API's metadata endpoints show here." }));
    fill(document.getElementById("instances"), a.instances.length
      ? h("table", { class: "table responsive" },
        h("thead", {}, h("tr", {}, ["Instance", "Cluster", "Type", "Memory"].map((t) => h("th", { scope: "col", text: t })))),
        h("tbody", {}, a.instances.map((i) => h("tr", {},
          h("td", { "data-label": "Instance", class: "mono", text: i.instance_name }),
          h("td", { "data-label": "Cluster", class: "mono", text: i.cluster_name || i.cluster_id }),
          h("td", { "data-label": "Type", text: i.cluster_type }),
          h("td", { "data-label": "Memory", text: memory(i.node_memory) })))))
      : h("div", { class: "empty" },
        h("p", { class: "empty-title", text: "No instances on this allocator" }),
        h("p", { class: "muted", text: "Its whole memory is free for new instances" + (a.status.maintenance_mode ? " once maintenance mode is stopped." : ".") })));
  }

  let gone = false;
  async function load() {
    try {
      const allocator = await api("GET", PATH);
      if (gone) location.reload();  // it exists again: rebuild the page
      render(allocator);
    } catch (err) {
      if (err.status === 404) {
        if (gone) return;
        gone = true;
        fill(document.getElementById("detail"), h("div", { class: "card empty" },
          h("p", { class: "empty-title", text: "Allocator " + id + " was not found" }),
          h("p", { class: "muted", text: "It may have been deleted, or its host's allocator role removed. The allocators page lists the allocators that exist." }),
          h("a", { class: "btn btn-primary", href: "/ui/allocators", text: "Back to allocators" })));
        fill(document.getElementById("badges"));
        if (toggle) toggle.remove();
        return;
      }
      throw err;
    }
  }

  refresh = poll(load);
})();
