// Users page: every user with its roles; admins create, enable, disable and delete users
// (built-in ones stay); everyone changes their own password. Passwords live only in the form
// fields until sent, and are cleared at once.
"use strict";

(() => {
  const { api, h, fill, sync, poll, dateTime, badge, chips, actionButton, toast, confirm, canWrite } = Muster;
  const tbody = document.getElementById("users");
  const summary = document.getElementById("summary");
  const me = document.body.dataset.user;
  let refresh = () => {};

  function failer(errorEl, formEl) {
    return (message, field) => {
      errorEl.textContent = message;
      errorEl.hidden = false;
      for (const el of formEl.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
      if (field) {
        field.setAttribute("aria-invalid", "true");
        field.focus();
      }
    };
  }

  // ---- create (admins) --------------------------------------------------------------------------
  const formEl = document.getElementById("create-form");
  if (formEl) {
    const errorEl = document.getElementById("create-error");
    const fail = failer(errorEl, formEl);
    formEl.addEventListener("submit", async (event) => {
      event.preventDefault();
      errorEl.hidden = true;
      const name = formEl.elements.user_name;
      const password = formEl.elements.password;
      if (!name.value.trim()) return fail("User name: enter a name.", name);
      if (password.value.length < Number(password.minLength)) {
        return fail("Password: enter at least " + password.minLength + " characters.", password);
      }
      const roles = Array.from(formEl.querySelectorAll("input[name=roles]:checked")).map((c) => c.value);
      if (!roles.length) return fail("Roles: choose at least one role.");
      const body = { user_name: name.value.trim(), security: { password: password.value, roles } };
      if (formEl.elements.full_name.value.trim()) body.full_name = formEl.elements.full_name.value.trim();
      if (formEl.elements.email.value.trim()) body.email = formEl.elements.email.value.trim();
      const submit = document.getElementById("create-user");
      submit.disabled = true;
      try {
        await api("POST", "/users", body);
        formEl.reset();
        for (const el of formEl.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
        toast("User " + body.user_name + " created.");
        refresh();
      } catch (err) {
        password.value = "";
        fail(err.message);
      } finally {
        submit.disabled = false;
      }
    });
  }

  // ---- own password (everyone) ------------------------------------------------------------------
  const passwordForm = document.getElementById("password-form");
  const passwordError = document.getElementById("password-error");
  const failPassword = failer(passwordError, passwordForm);
  passwordForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    passwordError.hidden = true;
    const password = passwordForm.elements.password;
    const repeat = passwordForm.elements.repeat;
    if (password.value.length < Number(password.minLength)) {
      return failPassword("New password: enter at least " + password.minLength + " characters.", password);
    }
    if (password.value !== repeat.value) return failPassword("Repeat it: the two passwords differ.", repeat);
    const body = { security: { password: password.value } };
    passwordForm.reset();
    try {
      await api("PATCH", "/user", body);
      location.assign("/ui/login?expired=1");
    } catch (err) {
      failPassword(err.message);
    }
  });

  // ---- list, enable/disable, delete -----------------------------------------------------------
  async function setEnabled(user, enabled) {
    await api("PATCH", "/users/" + encodeURIComponent(user.user_name), { security: { enabled } });
    toast("User " + user.user_name + (enabled ? " enabled." : " disabled: their sessions ended."));
    refresh();
  }

  async function remove(user) {
    const yes = await confirm({
      title: "Delete this user?",
      message: "User " + user.user_name + " will no longer sign in. Their API keys and sessions end now.",
      confirmLabel: "Delete user",
    });
    if (!yes) return;
    await api("DELETE", "/users/" + encodeURIComponent(user.user_name));
    toast("User " + user.user_name + " deleted.");
    refresh();
  }

  function createRow() {
    const row = h("tr", {},
      h("td", { "data-label": "User" }, h("span", { class: "strong user-name" }), h("span", { class: "sub user-detail" })),
      h("td", { "data-label": "Roles" }),
      h("td", { "data-label": "Status" }),
      h("td", { "data-label": "Created", class: "nowrap" }));
    if (canWrite) {
      row.append(h("td", { class: "actions", "data-label": "Actions" },
        actionButton({ class: "btn btn-small toggle-button" }, "Disable", () => setEnabled(row._user, !row._user.security.enabled)),
        actionButton({ class: "btn btn-small btn-danger-ghost delete-button" }, "Delete", () => remove(row._user))));
    }
    return row;
  }

  function updateRow(row, u) {
    row._user = u;
    const [who, roles, status, created] = row.children;
    who.querySelector(".user-name").textContent = u.user_name + (u.user_name === me ? " (you)" : "");
    who.querySelector(".user-detail").textContent = [u.full_name, u.email].filter(Boolean).join(" · ");
    fill(roles, chips(u.security.roles || [], "chip-role"));
    fill(status,
      u.security.enabled ? badge("ok", "Enabled") : badge("danger", "Disabled"),
      u.builtin ? badge("neutral", "Built in") : "");
    fill(created, h("span", { text: dateTime(u.metadata.created_at) }),
      u.metadata.created_by ? h("span", { class: "sub", text: "by " + u.metadata.created_by }) : "");
    if (canWrite) {
      const fixed = u.builtin || u.user_name === me;
      const toggle = row.querySelector(".toggle-button");
      const del = row.querySelector(".delete-button");
      toggle.hidden = fixed;
      del.hidden = fixed;
      toggle.textContent = u.security.enabled ? "Disable" : "Enable";
      toggle.setAttribute("aria-label", toggle.textContent + " user " + u.user_name);
      del.setAttribute("aria-label", "Delete user " + u.user_name);
    }
  }

  async function load() {
    const users = (await api("GET", "/users?include_disabled=true")).users;
    const text = users.length + (users.length === 1 ? " user" : " users");
    if (summary.textContent !== text) summary.textContent = text;
    sync(tbody, users, (u) => u.user_name, createRow, updateRow);
  }

  refresh = poll(load);
})();
