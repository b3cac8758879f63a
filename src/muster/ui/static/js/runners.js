// Hosts page: every runner with roles, connection and last heartbeat; change roles, delete.
"use strict";

(() => {
  const { api, h, fill, sync, poll, memory, time, connection, chips, actionButton, toast,
    confirm, canWrite, breakable } = Muster;
  const PATH = "/platform/infrastructure/runners";
  const tbody = document.getElementById("runners");
  const emptyEl = document.getElementById("runners-empty");
  const table = document.getElementById("runners-table");
  const summary = document.getElementById("summary");
  let refresh = () => {};

  // ---- change roles -----------------------------------------------------------------------------
  const dialog = document.getElementById("roles-dialog");
  let editing = null;
  let opener = null;
  if (dialog) {
    const formEl = document.getElementById("roles-form");
    const errorEl = document.getElementById("roles-error");
    formEl.addEventListener("submit", async (event) => {
      if (!event.submitter || event.submitter.value !== "save") return;  // Cancel closes
      event.preventDefault();
      const roles = Array.from(formEl.querySelectorAll("input[name=role]:checked")).map((c) => ({ role_name: c.value }));
      const save = document.getElementById("roles-save");
      save.disabled = true;
      try {
        await api("PUT", PATH + "/" + encodeURIComponent(editing) + "/roles", { roles });
        dialog.close("saved");
        toast("Roles of " + editing + " are now: " + (roles.map((r) => r.role_name).join(", ") || "none") + ".");
        refresh();
      } catch (err) {
        errorEl.textContent = err.message;
        errorEl.hidden = false;
      } finally {
        save.disabled = false;
      }
    });
    dialog.addEventListener("close", () => {
      if (opener && document.contains(opener)) opener.focus();
    });
  }

  function openRoles(runner, button) {
    editing = runner.runner_id;
    opener = button;
    document.getElementById("roles-title").textContent = "Change roles of " + runner.runner_id;
    const held = new Set(runner.roles.map((r) => r.role_name));
    for (const box of dialog.querySelectorAll("input[name=role]")) box.checked = held.has(box.value);
    document.getElementById("roles-error").hidden = true;
    dialog.showModal();
    dialog.querySelector("input[name=role]").focus();
  }

  async function remove(runner) {
    const yes = await confirm({
      title: "Delete host " + runner.runner_id + "?",
      message: "Its certificate is revoked at once" +
        (runner.roles.some((r) => r.role_name === "allocator") ? " and its allocator is removed" : "") +
        ". To bring the host back, install it again with a roles token." +
        (runner.connected ? " The host is still connected: stop Muster on it first." : ""),
      confirmLabel: "Delete host",
    });
    if (!yes) return;
    await api("DELETE", PATH + "/" + encodeURIComponent(runner.runner_id));
    toast("Host " + runner.runner_id + " deleted.");
    refresh();
  }

  // ---- table ------------------------------------------------------------------------------------
  function createRow() {
    const row = h("tr", {},
      h("td", { "data-label": "Host" }, h("span", { class: "mono strong host-id" }), h("span", { class: "sub mono host-ip" })),
      h("td", { "data-label": "Zone", class: "nowrap" }),
      h("td", { "data-label": "Roles", class: "roles-cell" }),
      h("td", { "data-label": "Status" }),
      h("td", { "data-label": "Last heartbeat", class: "nowrap" }),
      h("td", { "data-label": "Memory", class: "nowrap" }));
    if (canWrite) {
      row.append(h("td", { class: "actions", "data-label": "Actions" },
        actionButton({ class: "btn btn-small roles-button" }, "Change roles", (b) => openRoles(row._runner, b)),
        actionButton({ class: "btn btn-small btn-danger-ghost delete-button" }, "Delete", () => remove(row._runner))));
    }
    return row;
  }

  function updateRow(row, r) {
    row._runner = r;
    const [host, zone, roles, status, seen, size] = row.children;
    fill(host.querySelector(".host-id"), breakable(r.runner_id));
    host.querySelector(".host-ip").textContent = r.host_ip === r.runner_id ? "" : r.host_ip;
    zone.textContent = r.zone || r.zone_id || "–";
    fill(roles, chips(r.roles.map((x) => x.role_name), "chip-role"));
    fill(status, connection(r.connected));
    fill(seen, time(r.last_heartbeat));
    const cap = r.capacity;
    fill(size, cap ? [memory(cap.memory_mb), h("span", { class: "sub", text: cap.cpus + " CPUs" })] : "–");
    row.classList.toggle("row-muted", !r.connected);
    if (canWrite) {
      row.querySelector(".roles-button").setAttribute("aria-label", "Change roles of " + r.runner_id);
      row.querySelector(".delete-button").setAttribute("aria-label", "Delete host " + r.runner_id);
    }
  }

  async function load() {
    const runners = (await api("GET", PATH)).runners;
    const up = runners.filter((r) => r.connected).length;
    const text = runners.length + (runners.length === 1 ? " host" : " hosts") + " · " + up + " connected · " + (runners.length - up) + " disconnected";
    if (summary.textContent !== text) summary.textContent = text;
    table.hidden = !runners.length;
    emptyEl.hidden = !!runners.length;
    if (!runners.length && !emptyEl.childElementCount) {
      fill(emptyEl,
        h("p", { class: "empty-title", text: "No hosts" }),
        h("p", { class: "muted", text: "Create a roles token and run the install command it shows on a host to add it." }),
        canWrite ? h("a", { class: "btn btn-primary", href: "/ui/tokens#create", text: "Create a roles token" }) : null);
    }
    sync(tbody, runners, (r) => r.runner_id, createRow, updateRow);
  }

  refresh = poll(load);
})();
