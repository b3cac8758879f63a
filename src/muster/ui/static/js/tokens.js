// Roles tokens page: create a token (shown once, with its install command), list, revoke.
// The token string lives only in this page's memory: it is never put in a URL or storage.
"use strict";

(() => {
  const { api, h, fill, sync, poll, dateTime, time, until, chips, actionButton, toast, confirm,
    copy, canWrite, breakable } = Muster;
  const PATH = "/platform/configuration/security/enrollment-tokens";
  const tbody = document.getElementById("tokens");
  const emptyEl = document.getElementById("tokens-empty");
  const table = document.getElementById("tokens-table");
  const summary = document.getElementById("summary");
  const coordinator = document.body.dataset.coordinator;
  let fresh = null;  // id of the token created on this page, highlighted in the list
  let refresh = () => {};

  // NEW_HOST_IP stays to be replaced on purpose: only the new host knows its address on the
  // coordinator's network (without --host-ip it takes its default route's).
  function installCommand(token, roles) {
    return "muster install --coordinator-host " + coordinator + " --roles-token '" + token + "'" +
      (roles.length ? " --roles " + roles.join(",") : "") +
      " --host-ip NEW_HOST_IP --availability-zone " + zoneName() +
      " --host-storage-path /var/lib/muster";
  }

  function zoneName() {
    const field = document.getElementById("zone");
    const value = field ? field.value.trim() : "";
    return value || "ece-zone-1";
  }

  // ---- create -----------------------------------------------------------------------------------
  const formEl = document.getElementById("create-form");
  if (formEl) {
    const panel = document.getElementById("new-token");
    const errorEl = document.getElementById("create-error");
    const validity = document.getElementById("validity");
    const unit = document.getElementById("validity-unit");
    const maxUses = document.getElementById("max-uses");

    const syncKind = () => {
      const ephemeral = formEl.elements.kind.value === "ephemeral";
      validity.disabled = !ephemeral;
      unit.disabled = !ephemeral;
    };
    for (const radio of formEl.querySelectorAll("input[name=kind]")) radio.addEventListener("change", syncKind);
    syncKind();

    function fail(message, field) {
      errorEl.textContent = message;
      errorEl.hidden = false;
      for (const el of formEl.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
      if (field) {
        field.setAttribute("aria-invalid", "true");
        field.focus();
      }
    }

    formEl.addEventListener("submit", async (event) => {
      event.preventDefault();
      errorEl.hidden = true;
      const roles = Array.from(formEl.querySelectorAll("input[name=roles]:checked")).map((c) => c.value);
      const body = { persistent: formEl.elements.kind.value === "persistent", roles };
      if (!body.persistent) {
        const n = Number(validity.value);
        if (!Number.isInteger(n) || n < 1) return fail("Valid for: enter a whole number of at least 1.", validity);
        body.validity_in_seconds = n * Number(unit.value);
      }
      if (maxUses.value.trim()) {
        const n = Number(maxUses.value);
        if (!Number.isInteger(n) || n < 1) return fail("Max uses: enter a whole number of at least 1, or leave it empty for no limit.", maxUses);
        body.max_uses = n;
      }
      body.description = formEl.elements.description.value.trim();
      const submit = document.getElementById("create-token");
      submit.disabled = true;
      try {
        const created = await api("POST", PATH, body);
        fresh = created.token_id;
        document.getElementById("token-value").textContent = created.token;
        document.getElementById("command-value").textContent = installCommand(created.token, roles);
        document.getElementById("new-token-id").textContent = "(id " + created.token_id + ")";
        panel.hidden = false;
        panel.focus();
        panel.scrollIntoView({ block: "start" });
        formEl.elements.description.value = "";
        maxUses.value = "";
        for (const el of formEl.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
        toast("Token created. Copy it now: it is shown only once.");
        refresh();
      } catch (err) {
        fail(err.message);
      } finally {
        submit.disabled = false;
      }
    });

    for (const button of document.querySelectorAll("[data-copy]")) {
      button.addEventListener("click", () => copy(document.getElementById(button.dataset.copy).textContent, button));
    }
    document.getElementById("new-token-done").addEventListener("click", () => {
      panel.hidden = true;
      document.getElementById("token-value").textContent = "";
      document.getElementById("command-value").textContent = "";
      document.getElementById("create-token").focus();
    });
  }

  // ---- list and revoke --------------------------------------------------------------------------
  async function revoke(token) {
    const yes = await confirm({
      title: "Revoke this token?",
      message: "Token " + token.token_id + (token.description ? " (" + token.description + ")" : "") +
        " will no longer let any host join. Hosts that already joined with it stay.",
      confirmLabel: "Revoke token",
    });
    if (!yes) return;
    await api("DELETE", PATH + "/" + encodeURIComponent(token.token_id));
    toast("Token " + token.token_id + " revoked.");
    refresh();
  }

  function createRow() {
    const row = h("tr", {},
      h("td", { "data-label": "Token" }, h("span", { class: "strong token-desc" }), h("span", { class: "sub mono token-id" })),
      h("td", { "data-label": "Roles" }),
      h("td", { "data-label": "Kind" }),
      h("td", { "data-label": "Expires", class: "nowrap" }),
      h("td", { "data-label": "Uses", class: "nowrap" }),
      h("td", { "data-label": "Created", class: "nowrap" }));
    if (canWrite) {
      row.append(h("td", { class: "actions", "data-label": "Actions" },
        actionButton({ class: "btn btn-small btn-danger-ghost revoke-button" }, "Revoke", () => revoke(row._token))));
    }
    return row;
  }

  function updateRow(row, t) {
    row._token = t;
    const [token, roles, kind, expires, uses, created] = row.children;
    token.querySelector(".token-desc").textContent = t.description || "No description";
    token.querySelector(".token-desc").classList.toggle("muted", !t.description);
    fill(token.querySelector(".token-id"), breakable(t.token_id));
    fill(roles, chips(t.roles, "chip-role"));
    kind.textContent = t.persistent ? "Persistent" : "Ephemeral";
    fill(expires, t.expiration_date ? time(t.expiration_date, until) : "never");
    uses.textContent = t.uses + (t.max_uses ? " of " + t.max_uses : "") +
      (t.last_used_date ? ", last " + Muster.ago(t.last_used_date) : "");
    fill(created, h("span", { text: dateTime(t.creation_date) }), h("span", { class: "sub", text: "by " + t.created_by }));
    row.classList.toggle("row-fresh", t.token_id === fresh);
    if (canWrite) row.querySelector(".revoke-button").setAttribute("aria-label", "Revoke token " + t.token_id);
  }

  async function load() {
    const tokens = (await api("GET", PATH)).tokens;
    tokens.sort((a, b) => b.creation_date.localeCompare(a.creation_date) || a.token_id.localeCompare(b.token_id));
    const text = tokens.length + (tokens.length === 1 ? " token" : " tokens");
    if (summary.textContent !== text) summary.textContent = text;
    table.hidden = !tokens.length;
    emptyEl.hidden = !!tokens.length;
    if (!tokens.length && !emptyEl.childElementCount) {
      fill(emptyEl,
        h("p", { class: "empty-title", text: "No active tokens" }),
        h("p", { class: "muted", text: canWrite ? "Create one above to add hosts to the platform." : "An admin creates roles tokens to add hosts." }));
    }
    sync(tbody, tokens, (t) => t.token_id, createRow, updateRow);
  }

  refresh = poll(load);
})();
