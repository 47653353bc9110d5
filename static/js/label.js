// Keyboard labeling and time measurement for the labeling page. No inline script anywhere:
// the Content-Security-Policy forbids it, and model text must never be able to run code.
(function () {
  "use strict";

  const CHOICE_KEYS = { "1": "left", "2": "right", "3": "tie", "4": "both_bad" };
  const STRENGTH_KEYS = { q: "1", w: "2", e: "3" };
  const FLAG_KEYS = { h: "harmful", u: "unsure" };

  // Time on the current pair counts only while the page is visible.
  let shownAt = performance.now();
  let hiddenFor = 0;
  let hiddenSince = null;

  function resetTimer() {
    shownAt = performance.now();
    hiddenFor = 0;
    hiddenSince = document.hidden ? performance.now() : null;
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) {
      hiddenSince = performance.now();
    } else if (hiddenSince !== null) {
      hiddenFor += performance.now() - hiddenSince;
      hiddenSince = null;
    }
  });

  function voteForm() {
    return document.getElementById("vote-form");
  }

  // A key pressed right after a swap can beat htmx to the new form, which would then post
  // natively and reload the page; processing an already processed form does nothing.
  function submit(form) {
    if (window.htmx) {
      window.htmx.process(form);
    }
    form.requestSubmit();
  }

  function check(form, name, value) {
    const input = form.querySelector('input[name="' + name + '"][value="' + value + '"]');
    if (input) {
      input.checked = input.type === "checkbox" ? !input.checked : true;
    }
  }

  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (form.id !== "vote-form") {
      return;
    }
    const spent = performance.now() - shownAt - hiddenFor;
    form.querySelector('input[name="time_spent_ms"]').value = String(Math.max(0, Math.round(spent)));
  }, true);

  document.addEventListener("keydown", function (event) {
    const form = voteForm();
    if (!form || event.ctrlKey && event.key !== "Enter" || event.altKey || event.metaKey) {
      return;
    }
    const typing = event.target.matches("textarea, input[type=text]");
    if (typing) {
      if (event.key === "Escape") {
        event.target.blur();
      } else if (event.key === "Enter" && event.ctrlKey) {
        event.preventDefault();
        submit(form);
      }
      return;
    }
    const key = event.key.toLowerCase();
    if (CHOICE_KEYS[key]) {
      check(form, "choice", CHOICE_KEYS[key]);
    } else if (STRENGTH_KEYS[key]) {
      check(form, "strength", STRENGTH_KEYS[key]);
    } else if (FLAG_KEYS[key]) {
      check(form, "flags", FLAG_KEYS[key]);
    } else if (key === "r") {
      form.querySelector("textarea[name=rationale]").focus();
    } else if (key === "s") {
      submit(document.getElementById("skip-form"));
    } else if (key === "enter") {
      submit(form);
    } else {
      return;
    }
    event.preventDefault();
  });

  // A new pair swapped in by htmx starts its own clock.
  document.addEventListener("htmx:afterSwap", function (event) {
    if (event.target.id === "pair" || event.detail.target.id === "pair") {
      resetTimer();
    }
  });
})();
