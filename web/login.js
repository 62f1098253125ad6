"use strict";
// Posts the form as JSON and shows the server's answer; without JavaScript the
// form posts itself and the server redirects.
(function () {
  const form = document.getElementById("login");
  const result = document.getElementById("result");

  function show(text, ok) {
    result.textContent = text;
    result.className = ok ? "ok" : "bad";
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    const body = {
      username: document.getElementById("username").value,
      password: document.getElementById("password").value,
    };
    try {
      const response = await fetch("login", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        credentials: "same-origin",
      });
      const answer = await response.json().catch(() => ({ error: "Unexpected answer" }));
      if (response.ok && answer.success) {
        show(answer.success, true);
        window.location.href = "./";
      } else {
        show(answer.error || "Login failed", false);
      }
    } catch (err) {
      show("Cannot reach the server", false);
    }
  });
})();
