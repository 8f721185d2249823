"use strict";
// The login form: the key goes once to POST /admin/login, which sets the session cookie.
const form = document.getElementById("login");
const error = document.getElementById("login-error");
if (form.dataset.refused) {
  error.textContent = "That key was refused.";
  error.hidden = false;
}
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.hidden = true;
  const key = document.getElementById("key").value.trim();
  let response;
  try {
    response = await fetch("/admin/login", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({key}),
      credentials: "same-origin",
    });
  } catch (e) {
    error.textContent = "The api did not answer: " + e;
    error.hidden = false;
    return;
  }
  if (response.ok) {
    location.replace("/admin" + location.hash);
    return;
  }
  const body = await response.json().catch(() => null);
  error.textContent = response.status === 403
    ? "That is a project key: the admin page needs an admin key."
    : (body && body.error && body.error.message) || "Log-in failed (" + response.status + ")";
  error.hidden = false;
});
