// fleetpki console: the live stream (Server-Sent Events) for pages marked data-live.
// Served from the package (script-src 'self'); it only ever writes text (textContent), so
// whatever a stored string looks like, it stays text.
"use strict";
(function () {
  const body = document.body;
  const since = body.dataset.live;
  if (since === undefined || !window.EventSource) return;
  const base = body.dataset.base;
  const device = body.dataset.device;
  const status = document.getElementById("live-status");
  const list = document.getElementById("live-list");
  const stream = new EventSource(base + "/events?since=" + encodeURIComponent(since));
  stream.onopen = function () { if (status) status.textContent = "live"; };
  stream.onerror = function () { if (status) status.textContent = "reconnecting…"; };
  stream.addEventListener("fleet", function (ev) {
    const fleet = JSON.parse(ev.data);
    const counts = Object.assign({ total: fleet.total, refused: fleet.refused }, fleet.by_state);
    if (fleet.connected !== null) counts.connected = fleet.connected;
    document.querySelectorAll("[data-count]").forEach(function (el) {
      const value = counts[el.dataset.count];
      if (value !== undefined) el.textContent = String(value);
    });
  });
  stream.addEventListener("audit", function (ev) {
    const entry = JSON.parse(ev.data);
    if (list) {
      const li = document.createElement("li");
      const time = document.createElement("time");
      time.textContent = entry.at.slice(11, 19);
      const action = document.createElement("b");
      action.textContent = entry.action;
      li.append(time, " ", action, " ");
      if (entry.device_id) {
        const a = document.createElement("a");
        a.href = base + "/devices/" + encodeURIComponent(entry.device_id);
        a.textContent = entry.device_id;
        li.append(a, " ");
      }
      const actor = document.createElement("span");
      actor.className = "actor";
      actor.textContent = entry.actor;
      li.append(actor);
      list.prepend(li);
      while (list.children.length > 50) list.lastElementChild.remove();
    }
    if (device && entry.device_id === device) {
      const note = document.getElementById("changed");
      if (note) note.hidden = false;
    }
  });
})();
