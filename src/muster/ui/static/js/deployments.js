// Deployments page: the create form (admin) and the list, each deployment with its status,
// instances (running of placed), memory and allocators, refreshed every 2 seconds.
"use strict";

(() => {
  const { api, h, fill, sync, poll, memory, badge, toast, canManageDeployments } = Muster;
  const DETAILS_SHOWN = 50;  // deployments whose instances are read on each refresh

  function instancesOf(doc) {
    return (doc.resources.container || []).flatMap((r) => r.info.topology.instances);
  }

  function statusOf(doc) {
    const statuses = (doc.resources.container || []).map((r) => r.info.status);
    if (statuses.includes("stopped")) return ["neutral", "Stopped"];
    if (statuses.some((s) => s === "initializing" || s === "reconfiguring")) return ["warning", "Applying plan"];
    return doc.healthy ? ["ok", "Running"] : ["danger", "Unhealthy"];
  }

  function createRow() {
    return h("tr", {},
      h("td", { "data-label": "Name" }, h("a", { class: "deployment-link" }), h("div", { class: "muted mono small deployment-id" })),
      h("td", { "data-label": "Status", class: "deployment-status" }),
      h("td", { "data-label": "Instances", class: "deployment-instances" }),
      h("td", { "data-label": "Memory", class: "deployment-memory" }),
      h("td", { "data-label": "Allocators", class: "deployment-allocators mono" }));
  }

  function updateRow(row, item) {
    const link = row.querySelector(".deployment-link");
    link.href = "/ui/deployments/" + encodeURIComponent(item.id);
    link.textContent = item.name;
    row.querySelector(".deployment-id").textContent = item.id;
    const doc = item.doc;
    if (!doc) {
      fill(row.querySelector(".deployment-status"), "–");
      return;
    }
    const [kind, text] = statusOf(doc);
    fill(row.querySelector(".deployment-status"), badge(kind, text));
    const instances = instancesOf(doc);
    const running = instances.filter((i) => i.service_running).length;
    fill(row.querySelector(".deployment-instances"), running + " of " + instances.length + " running");
    const total = instances.reduce((sum, i) => sum + i.memory.instance_capacity, 0);
    fill(row.querySelector(".deployment-memory"), memory(total));
    const allocators = [...new Set(instances.map((i) => i.allocator_id))];
    fill(row.querySelector(".deployment-allocators"), allocators.join(", ") || "–");
  }

  async function load() {
    const listed = (await api("GET", "/deployments")).deployments;
    const docs = await Promise.all(listed.slice(-DETAILS_SHOWN).map((d) =>
      api("GET", "/deployments/" + encodeURIComponent(d.id)).catch(() => null)));
    const byId = new Map(docs.filter(Boolean).map((d) => [d.id, d]));
    const items = listed.slice().reverse().map((d) => ({ id: d.id, name: d.name, doc: byId.get(d.id) }));
    sync(document.getElementById("deployments"), items, (d) => d.id, createRow, updateRow);
    const emptyEl = document.getElementById("deployments-empty");
    emptyEl.hidden = items.length > 0;
    document.getElementById("deployments-table").hidden = items.length === 0;
    if (!items.length) {
      fill(emptyEl, h("p", { class: "empty-title", text: "No deployments yet" }),
        h("p", { class: "muted", text: canManageDeployments ? "Create one with the form above: its instances are placed on allocators with free memory." : "An admin or a deployment manager creates deployments." }));
    }
    document.getElementById("summary").textContent = items.length + (items.length === 1 ? " deployment" : " deployments");
  }

  function envOf(text) {
    const env = {};
    for (const [n, raw] of text.split("\n").entries()) {
      const line = raw.trim();
      if (!line) continue;
      const at = line.indexOf("=");
      if (at <= 0) throw new Error("Environment line " + (n + 1) + ": write KEY=value.");
      env[line.slice(0, at)] = line.slice(at + 1);
    }
    return env;
  }

  const refresh = poll(load);
  const form = document.getElementById("create-form");
  if (form) {
    const error = document.getElementById("create-error");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = document.getElementById("create-deployment");
      if (button.getAttribute("aria-busy") === "true") return;
      error.hidden = true;
      const data = new FormData(form);
      const name = String(data.get("name") || "").trim();
      const image = String(data.get("image") || "").trim();
      const command = String(data.get("command") || "").trim();
      let env;
      try {
        if (!name) throw new Error("Give the deployment a name.");
        if (!image) throw new Error("Give the container image.");
        env = envOf(String(data.get("env") || ""));
      } catch (err) {
        error.textContent = err.message;
        error.hidden = false;
        return;
      }
      const container = { image };
      if (command) container.command = ["sh", "-c", command];
      if (Object.keys(env).length) container.env = env;
      const body = {
        name,
        resources: { container: [{ ref_id: "main", plan: {
          cluster_topology: [{ zone_count: Number(data.get("zones")), size: { resource: "memory", value: Number(data.get("memory")) } }],
          container,
        } }] },
      };
      button.setAttribute("aria-busy", "true");
      try {
        const created = await api("POST", "/deployments", body);
        toast("Deployment " + created.name + " created: its instances are placed.");
        form.reset();
        refresh();
      } catch (err) {
        error.textContent = err.message;
        error.hidden = false;
      } finally {
        button.removeAttribute("aria-busy");
      }
    });
  }
})();
