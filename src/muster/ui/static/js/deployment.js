// Deployment detail page: its instances with their allocators and addresses, the plan
// activity (pending, current and past attempts with their steps and errors), shut down, delete.
"use strict";

(() => {
  const { api, h, fill, poll, memory, time, dateTime, badge, actionButton, confirm, toast, canManageDeployments } = Muster;
  const id = document.body.dataset.deploymentId;
  const PATH = "/deployments/" + encodeURIComponent(id);
  const actions = document.getElementById("actions");
  let current = null;
  let refresh = () => {};

  if (canManageDeployments) {
    actions.append(actionButton({ class: "btn btn-danger", id: "shutdown" }, "Shut down", async () => {
      const yes = await confirm({ title: "Shut down " + current.name + "?", message: "Every instance stops and its memory is freed. A shut-down deployment can only be deleted.", confirmLabel: "Shut down" });
      if (!yes) return;
      await api("POST", PATH + "/_shutdown");
      toast("Deployment " + current.name + " shut down.");
      refresh();
    }));
    actions.append(actionButton({ class: "btn btn-danger", id: "delete", hidden: true }, "Delete", async () => {
      const yes = await confirm({ title: "Delete " + current.name + "?", message: "Its plans and history are deleted for good.", confirmLabel: "Delete" });
      if (!yes) return;
      await api("DELETE", PATH);
      location.assign("/ui/deployments");
    }));
  }

  function instanceRow(resource, i) {
    const state = i.service_running ? badge("ok", "Running") : i.container_started ? badge("warning", "Starting") : badge("neutral", "Placed");
    return h("tr", {},
      h("td", { "data-label": "Instance", class: "mono", text: i.instance_name }),
      h("td", { "data-label": "Resource", text: resource.ref_id }),
      h("td", { "data-label": "State" }, state),
      h("td", { "data-label": "Allocator" }, h("a", { class: "mono", href: "/ui/allocators/" + encodeURIComponent(i.allocator_id), text: i.allocator_id })),
      h("td", { "data-label": "Zone", text: i.zone }),
      h("td", { "data-label": "Memory", text: memory(i.memory.instance_capacity) }),
      h("td", { "data-label": "Address", class: "mono", text: i.address || "–" }));
  }

  function attempt(resource, label, a) {
    const steps = (a.plan_attempt_log || []).map((s) => h("li", {},
      h("span", { class: "mono", text: s.step_id }), " ",
      badge(s.status === "success" ? "ok" : s.status === "error" ? "danger" : "neutral", s.status),
      (s.info_log || []).length ? h("ul", { class: "muted" }, s.info_log.map((m) => h("li", { text: m.message }))) : null));
    return h("div", { class: "plan-attempt" },
      h("h3", {}, resource.ref_id + ": " + label + " ", h("span", { class: "muted mono", text: a.plan_attempt_name })),
      h("p", { class: "muted" }, "started ", time(a.attempt_start_time, dateTime),
        a.attempt_end_time ? [", ended ", time(a.attempt_end_time, dateTime)] : null),
      a.error ? h("p", { class: "banner error", text: a.error.message }) : null,
      h("ul", { class: "plan-steps" }, steps));
  }

  function render(d) {
    current = d;
    document.title = d.name + " · Muster Cloud UI";
    fill(document.getElementById("deployment-name"), "Deployment ", h("span", { text: d.name }));
    document.getElementById("crumb").textContent = d.name;
    const resources = d.resources.container || [];
    const stopped = resources.some((r) => r.info.status === "stopped");
    const statuses = [...new Set(resources.map((r) => r.info.status))];
    fill(document.getElementById("badges"),
      statuses.map((s) => badge(s === "started" ? "ok" : s === "stopped" ? "neutral" : "warning", s)), " ",
      d.healthy ? badge("ok", "Healthy") : badge("danger", "Not healthy"), " ",
      h("span", { class: "muted mono", text: d.id }));
    const shutdown = document.getElementById("shutdown");
    const del = document.getElementById("delete");
    if (shutdown) shutdown.hidden = stopped;
    if (del) del.hidden = !stopped;
    const rows = resources.flatMap((r) => r.info.topology.instances.map((i) => instanceRow(r, i)));
    const running = resources.flatMap((r) => r.info.topology.instances).filter((i) => i.service_running).length;
    document.getElementById("inst-summary").textContent = running + " of " + rows.length + " running";
    fill(document.getElementById("instances"), rows.length
      ? h("table", { class: "table responsive", id: "instances-table" },
        h("thead", {}, h("tr", {}, ["Instance", "Resource", "State", "Allocator", "Zone", "Memory", "Address"].map((t) => h("th", { scope: "col", text: t })))),
        h("tbody", {}, rows))
      : h("div", { class: "empty" }, h("p", { class: "empty-title", text: "No instances" }),
        h("p", { class: "muted", text: stopped ? "The deployment is shut down." : "Its instances are being placed." })));
    const plans = resources.flatMap((r) => {
      const info = r.info.plan_info;
      return [
        info.pending ? attempt(r, "pending plan", info.pending) : null,
        info.current ? attempt(r, "current plan", info.current) : null,
        ...(info.history || []).slice().reverse().filter((a) => !info.current || a.plan_attempt_id !== info.current.plan_attempt_id).map((a) => attempt(r, "earlier plan", a)),
      ];
    }).filter(Boolean);
    fill(document.getElementById("plans"), plans.length ? plans : h("p", { class: "muted", text: "No plan attempts." }));
  }

  async function load() {
    try {
      render(await api("GET", PATH + "?show_plan_history=true"));
    } catch (err) {
      if (err.status === 404) {
        fill(document.getElementById("detail"), h("div", { class: "card empty" },
          h("p", { class: "empty-title", text: "Deployment " + id + " was not found" }),
          h("p", { class: "muted", text: "It may have been deleted." }),
          h("a", { class: "btn btn-primary", href: "/ui/deployments", text: "Back to deployments" })));
        actions.replaceChildren();
        return;
      }
      throw err;
    }
  }

  refresh = poll(load);
})();
