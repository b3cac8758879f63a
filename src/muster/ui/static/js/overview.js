// Overview page: host and allocator counts, memory per zone as bars, the list of hosts.
"use strict";

(() => {
  const { api, h, fill, sync, poll, memory, ago, connection, chips } = Muster;
  const ALLOCATORS = "/platform/infrastructure/allocators?size=10000";
  const RUNNERS = "/platform/infrastructure/runners";

  function zoneTotals(zone) {
    let used = 0, free = 0, off = 0, connected = 0;
    for (const a of zone.allocators) {
      const total = a.capacity.memory.total;
      const u = a.capacity.memory.used;
      used += u;
      if (a.status.connected && !a.status.maintenance_mode) {
        free += Math.max(0, total - u);
        connected += 1;
      } else off += Math.max(0, total - u);
    }
    return { used, free, off, total: used + free + off, connected, count: zone.allocators.length };
  }

  function segment(cls, value, total) {
    const el = h("span", { class: "seg " + cls });
    el.style.width = total > 0 ? ((value / total) * 100).toFixed(2) + "%" : "0";
    return el;
  }

  function renderZones(container, zones) {
    if (!zones.length) {
      container.dataset.state = "empty";
      fill(container,
        h("div", { class: "empty" },
          h("p", { class: "empty-title", text: "No allocators yet" }),
          h("p", { class: "muted", text: "Allocators offer their host's memory. Create a roles token with the allocator role, then run the install command it shows on the new host." }),
          Muster.canWrite ? h("a", { class: "btn btn-primary", href: "/ui/tokens#create", text: "Create a roles token" }) : null));
      return;
    }
    if (container.dataset.state === "empty") container.replaceChildren();
    container.dataset.state = "zones";
    sync(container, zones, (z) => z.zone_id,
      (z) => h("div", { class: "zone" },
        h("div", { class: "zone-head" },
          h("a", { class: "zone-name", href: "/ui/allocators?q=" + encodeURIComponent("zone:" + z.zone_id), text: z.zone_id }),
          h("span", { class: "zone-figures" })),
        h("div", { class: "zone-bar", role: "img" }),
        h("p", { class: "zone-note muted" })),
      (el, z) => {
        const t = zoneTotals(z);
        el.querySelector(".zone-figures").textContent = memory(t.used) + " used of " + memory(t.total);
        const bar = el.querySelector(".zone-bar");
        bar.setAttribute("aria-label", "Zone " + z.zone_id + ": " + memory(t.used) + " used, " +
          memory(t.free) + " free on connected allocators, " + memory(t.off) +
          " on disconnected or maintenance allocators");
        fill(bar, segment("seg-used", t.used, t.total), segment("seg-free", t.free, t.total),
          segment("seg-off", t.off, t.total));
        el.querySelector(".zone-note").textContent = t.count + (t.count === 1 ? " allocator" : " allocators") +
          ", " + t.connected + " accepting instances";
      });
  }

  function renderHosts(list, runners) {
    if (!runners.length) {
      fill(list, h("li", { class: "muted", text: "No hosts have joined yet." }));
      return;
    }
    const ordered = runners.slice().sort((a, b) =>
      (a.connected === b.connected ? a.runner_id.localeCompare(b.runner_id) : a.connected ? 1 : -1));
    sync(list, ordered, (r) => r.runner_id,
      () => h("li", { class: "host-item" },
        h("span", { class: "host-main" }, h("span", { class: "host-id mono" }), h("span", { class: "host-roles" })),
        h("span", { class: "host-state" }), h("span", { class: "host-seen muted" })),
      (el, r) => {
        el.querySelector(".host-id").textContent = r.runner_id;
        fill(el.querySelector(".host-roles"), chips(r.roles.map((x) => x.role_name)));
        fill(el.querySelector(".host-state"), connection(r.connected));
        el.querySelector(".host-seen").textContent = ago(r.last_heartbeat);
      });
  }

  function setStat(id, value, note) {
    document.getElementById("stat-" + id).textContent = value;
    document.getElementById("stat-" + id + "-note").textContent = note;
  }

  async function load() {
    const [overview, runners] = await Promise.all([api("GET", ALLOCATORS), api("GET", RUNNERS)]);
    const zones = overview.zones;
    const all = zones.flatMap((z) => z.allocators);
    const connected = all.filter((a) => a.status.connected).length;
    const maintenance = all.filter((a) => a.status.maintenance_mode).length;
    const hosts = runners.runners;
    const hostsUp = hosts.filter((r) => r.connected).length;
    let used = 0, total = 0;
    for (const a of all) { used += a.capacity.memory.used; total += a.capacity.memory.total; }
    setStat("hosts", String(hosts.length), hostsUp + " connected, " + (hosts.length - hostsUp) + " disconnected");
    setStat("connected", String(connected), maintenance ? maintenance + " in maintenance" : "none in maintenance");
    setStat("disconnected", String(all.length - connected), all.length - connected ? "check these hosts" : "all allocators reachable");
    document.getElementById("stat-disconnected").classList.toggle("bad", all.length - connected > 0);
    setStat("memory", memory(used), "of " + memory(total) + " in " + zones.length + (zones.length === 1 ? " zone" : " zones"));
    renderZones(document.getElementById("zones"), zones);
    renderHosts(document.getElementById("hosts"), hosts);
  }

  poll(load);
})();
