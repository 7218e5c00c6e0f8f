// taskiq-beat dashboard: times in the viewer's zone, and live data by polling fragments.
(function () {
  "use strict";
  var zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  var pad = function (n) { return String(n).padStart(2, "0"); };

  function localTimes(root) {
    root.querySelectorAll("time[datetime]:not([data-local])").forEach(function (el) {
      var date = new Date(el.getAttribute("datetime"));
      if (isNaN(date.getTime())) { return; }
      var utc = el.textContent;
      var local = date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) +
        " " + pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
      el.textContent = local;
      var small = document.createElement("span");
      small.className = "utc";
      small.textContent = utc;
      el.appendChild(small);
      el.setAttribute("title", utc + " = " + local + " " + zone);
      el.setAttribute("data-local", "");
    });
  }

  function setState(text) {
    var state = document.querySelector("[data-live-state]");
    if (state) { state.textContent = text; }
  }

  function poll(region) {
    var url = region.getAttribute("data-live");
    var every = parseInt(region.getAttribute("data-poll-ms"), 10);
    if (!url || !every) { return; }
    var busy = false;
    setInterval(function () {
      if (busy || document.hidden || region.contains(document.activeElement)) { return; }
      busy = true;
      region.setAttribute("aria-busy", "true");
      fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "poll" } })
        .then(function (response) {
          return response.text().then(function (html) {
            if (!response.ok && response.status !== 503) { throw new Error(response.status); }
            region.innerHTML = html;
            localTimes(region);
            setState(response.ok ? "Updated " + new Date().toLocaleTimeString() + "." :
              "The database did not answer; retrying.");
          });
        })
        .catch(function (error) { setState("Live updates paused (" + error.message + "); reload the page."); })
        .then(function () { busy = false; region.removeAttribute("aria-busy"); });
    }, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-zone]").forEach(function (el) { el.textContent = zone; });
    localTimes(document);
    document.querySelectorAll("[data-live]").forEach(poll);
  });
})();
