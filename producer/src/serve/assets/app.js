// labfleet dashboard: live updates of a deployment page over server-sent events.
// Served as a file (the Content-Security-Policy allows no inline script); it only
// rewrites text and attributes of elements the server rendered.
"use strict";
(function () {
  const root = document.getElementById("deployment");
  if (!root || !window.EventSource) return;

  function text(id, value) {
    const el = document.getElementById(id);
    if (el) el.textContent = String(value);
  }

  function badges(counts) {
    const frag = document.createDocumentFragment();
    for (const k of Object.keys(counts).sort()) {
      const b = document.createElement("span");
      b.className = "badge s-" + k;
      b.textContent = k + " " + counts[k];
      frag.appendChild(b);
      frag.appendChild(document.createTextNode(" "));
    }
    return frag;
  }

  function perNode(map) {
    const body = document.querySelector("#per-node tbody");
    if (!body) return;
    body.replaceChildren();
    for (const node of Object.keys(map).sort()) {
      const tr = document.createElement("tr");
      const a = document.createElement("td");
      a.textContent = node;
      const b = document.createElement("td");
      b.appendChild(badges(map[node]));
      tr.append(a, b);
      body.appendChild(tr);
    }
  }

  function failure(c, cell) {
    const body = document.querySelector("#failures tbody");
    if (!body) return;
    let row = document.getElementById("f-" + c.i);
    if (c.s !== "failed") {
      if (row) row.remove();
      return;
    }
    if (!row) {
      row = document.createElement("tr");
      row.id = "f-" + c.i;
      for (let k = 0; k < 5; k++) row.appendChild(document.createElement("td"));
      row.lastChild.className = "error";
      body.appendChild(row);
    }
    const tds = row.children;
    tds[0].textContent = cell ? cell.dataset.name : "";
    tds[1].textContent = cell ? cell.dataset.user : "";
    tds[2].textContent = c.v == null ? "" : String(c.v);
    tds[3].textContent = c.n;
    tds[4].textContent = c.e || "";
  }

  function apply(m) {
    for (const c of m.cells) {
      const td = document.getElementById("vm-" + c.i);
      if (td) {
        td.dataset.state = c.s;
        td.className = "cell s-" + c.s;
        td.querySelector(".st").textContent = c.s;
        td.querySelector(".id").textContent = c.v == null ? "" : String(c.v);
        td.querySelector(".nd").textContent = c.s === "removed" ? "" : c.n;
        td.title = c.e || td.dataset.name;
      }
      failure(c, td);
    }
    const state = document.getElementById("state");
    if (state) {
      state.textContent = m.state;
      state.className = "s-" + m.state;
    }
    text("phase", m.phase);
    text("finished", m.finished);
    text("total", m.total);
    const bar = document.getElementById("bar");
    if (bar) {
      bar.max = Math.max(1, m.total);
      bar.value = m.finished;
    }
    const counts = document.getElementById("counts");
    if (counts) counts.replaceChildren(badges(m.counts));
    perNode(m.per_node);
    const retry = document.getElementById("retry-form");
    if (retry) retry.hidden = !((m.counts.failed || 0) > 0 || m.dead > 0);
    const teardown = document.getElementById("teardown");
    if (teardown) teardown.hidden = m.phase !== "active";
    root.dataset.updates = String(Number(root.dataset.updates || "0") + 1);
  }

  const es = new EventSource(root.dataset.events);
  es.addEventListener("update", function (ev) {
    apply(JSON.parse(ev.data));
  });
  es.addEventListener("open", function () {
    root.dataset.live = "yes";
  });
  es.addEventListener("error", function () {
    root.dataset.live = "reconnecting";
  });
})();
