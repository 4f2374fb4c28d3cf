// poolkeeper's console: live updates from the server's event stream (/ui/events), TTL
// countdowns, uploads by drag and drop, confirmations. No framework, no inline script (the
// Content-Security-Policy forbids it), and no polling: the server pushes.
"use strict";
(function () {
  const csrf = (document.querySelector('meta[name="pk-csrf"]') || {}).content;
  // Timings of what the stream showed, for the browser tests and benchmarks:
  // {claim, phase, engineMs, shownMs}.
  window.pkTimings = [];
  if (!csrf) return; // signed out: nothing live

  const byData = (attr, value, root) =>
    Array.from((root || document).querySelectorAll("[" + attr + "]"))
      .filter((e) => e.getAttribute(attr) === value);
  const setField = (root, field, value) => {
    for (const e of root.querySelectorAll('[data-field="' + field + '"]')) {
      e.textContent = value == null ? "" : String(value);
    }
  };
  // host:port only: nothing else becomes a link.
  const safeAddress = (a) => typeof a === "string" && /^[A-Za-z0-9.\-\[\]:]+$/.test(a) ? a : "";

  // --- claims -------------------------------------------------------------------------------
  function claimCard(name) {
    let card = byData("data-claim", name)[0];
    const list = document.getElementById("claims");
    const tpl = document.getElementById("claim-template");
    if (card || !list || !tpl) return card;
    card = tpl.content.firstElementChild.cloneNode(true);
    card.setAttribute("data-claim", name);
    const h = card.querySelector("h3");
    h.id = "claim-" + name;
    card.setAttribute("aria-labelledby", h.id);
    const logs = card.querySelector("[data-logs]");
    if (logs) logs.setAttribute("data-logs", "/ui/claims/" + encodeURIComponent(name) + "/logs");
    const release = card.querySelector("form[data-release]");
    release.action = "/ui/claims/" + encodeURIComponent(name) + "/release";
    release.querySelector('input[name="csrf"]').value = csrf;
    list.prepend(card);
    wireUpload(card);
    const none = document.getElementById("no-claims");
    if (none) none.hidden = true;
    return card;
  }

  function showClaim(c) {
    const row = byData("data-claim", c.name);
    let targets = row;
    if (!row.length && !c.gone) {
      const card = claimCard(c.name);
      targets = card ? [card] : [];
    }
    for (const el of targets) {
      el.setAttribute("data-phase", c.phase);
      setField(el, "name", c.name);
      if (c.pool) setField(el, "pool", c.pool);
      setField(el, "phase", c.phase);
      setField(el, "queue", c.queuePosition ? "#" + c.queuePosition + " in the queue" : "");
      const addr = safeAddress(c.address);
      setField(el, "address", addr);
      const link = el.querySelector('[data-field="link"]');
      if (link) {
        if (addr) link.href = "http://" + addr + "/"; else link.removeAttribute("href");
      }
      const showAddr = el.querySelector('[data-show="address"]');
      if (showAddr) showAddr.hidden = !addr;
      setField(el, "ssh", c.ssh || "");
      const showSsh = el.querySelector('[data-show="ssh"]');
      if (showSsh) showSsh.hidden = !c.ssh;
      const ttl = el.querySelector("[data-expires]");
      if (ttl) ttl.setAttribute("data-expires", c.expiresAt || "");
      const up = el.querySelector("[data-upload]");
      if (up) up.hidden = c.phase !== "Bound";
      const out = el.querySelector('[data-show="logs"]');
      if (out) out.hidden = c.phase !== "Bound";
      if (c.gone && el.classList.contains("claim")) {
        setField(el, "phase", c.phase + " (gone)");
        setTimeout(() => el.remove(), 4000);
      }
    }
    const held = document.querySelector("[data-held]");
    if (held) {
      const live = Array.from(document.querySelectorAll(".claim[data-phase]"))
        .filter((e) => ["Pending", "Bound"].includes(e.getAttribute("data-phase")));
      held.textContent = String(live.length);
    }
    tickTtl();
    window.pkTimings.push({ claim: c.name, phase: c.phase, engineMs: c.engineMs, shownMs: Date.now() });
  }

  // --- pools --------------------------------------------------------------------------------
  function points(history, pick, top) {
    const n = Math.max(history.length, 2) - 1;
    return history.map((p, i) =>
      (i * 120 / n).toFixed(1) + "," + (31 - pick(p) * 30 / top).toFixed(1)).join(" ");
  }

  function showPools(rows) {
    for (const p of rows) {
      for (const el of byData("data-pool", p.name)) {
        for (const f of ["warm", "desired", "bound", "starting", "queued", "quarantined", "hits", "misses"]) {
          setField(el, f, p[f]);
        }
        const ready = el.querySelector("[data-ready]");
        if (ready) {
          ready.setAttribute("data-ready", p.ready);
          setField(ready, "ready", p.ready === "True" ? "Ready" : "Not ready");
          setField(ready, "readyReason", p.readyReason);
        }
        if (p.history && p.history.length) {
          const top = Math.max(1, ...p.history.map((h) => Math.max(h[0], h[1])));
          const w = el.querySelector('[data-line="warm"]');
          const b = el.querySelector('[data-line="bound"]');
          if (w) w.setAttribute("points", points(p.history, (h) => h[0], top));
          if (b) b.setAttribute("points", points(p.history, (h) => h[1], top));
          setField(el, "top", top);
        }
      }
    }
    window.pkPools = rows;
  }

  // --- recent events (operators) ------------------------------------------------------------
  function showEvents(rows) {
    const body = document.getElementById("recent-events");
    if (!body) return;
    const fresh = document.createDocumentFragment();
    for (const e of rows) {
      const tr = document.createElement("tr");
      const reason = e.count > 1 ? e.reason + " ×" + e.count : e.reason;
      for (const v of [e.time, e.object, e.type, reason, e.message]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      }
      fresh.appendChild(tr);
    }
    body.replaceChildren(fresh);
  }

  // --- TTL countdown (a local clock, not a request) -----------------------------------------
  function tickTtl() {
    const now = Date.now();
    for (const e of document.querySelectorAll("[data-expires]")) {
      const at = Date.parse(e.getAttribute("data-expires") || "");
      if (isNaN(at)) { e.textContent = ""; continue; }
      const s = Math.max(0, Math.round((at - now) / 1000));
      const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
      e.textContent = "· " + (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s left";
    }
  }
  setInterval(tickTtl, 1000);
  tickTtl();

  // --- uploads --------------------------------------------------------------------------------
  function send(card, files, tar) {
    const name = card.getAttribute("data-claim");
    const result = card.querySelector("[data-result]");
    let body, type = null;
    if (tar) { body = tar; type = "application/x-tar"; }
    else {
      body = new FormData();
      for (const f of files) body.append("file", f.file, f.path);
    }
    result.textContent = "Uploading…";
    const headers = { "X-CSRF-Token": csrf };
    if (type) headers["Content-Type"] = type;
    fetch("/ui/claims/" + encodeURIComponent(name) + "/files", { method: "POST", body, headers, credentials: "same-origin" })
      .then((r) => r.json().then((v) => ({ ok: r.ok, v })))
      .then(({ ok, v }) => {
        result.textContent = ok ? "Uploaded " + v.files + " file(s)." : "Refused: " + (v.error || "error");
      })
      .catch((e) => { result.textContent = "Upload failed: " + e; });
  }

  // Files of a drop, folders walked (webkitGetAsEntry), each with its relative path.
  function dropped(items) {
    const out = [];
    const walk = (entry, prefix) => new Promise((resolve) => {
      if (entry.isFile) {
        entry.file((f) => { out.push({ file: f, path: prefix + f.name }); resolve(); }, () => resolve());
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        const all = [];
        const more = () => reader.readEntries((batch) => {
          if (!batch.length) {
            Promise.all(all.map((e) => walk(e, prefix + entry.name + "/"))).then(resolve);
          } else { all.push(...batch); more(); }
        }, () => resolve());
        more();
      } else resolve();
    });
    const entries = Array.from(items).map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
    return Promise.all(entries.map((e) => walk(e, ""))).then(() => out);
  }

  function wireUpload(card) {
    const form = card.querySelector("[data-upload]");
    if (!form || form.dataset.wired) return;
    form.dataset.wired = "1";
    form.addEventListener("submit", (e) => e.preventDefault());
    for (const input of form.querySelectorAll("[data-files]")) {
      input.addEventListener("change", () => {
        const files = Array.from(input.files).map((f) => ({ file: f, path: f.webkitRelativePath || f.name }));
        if (files.length) send(card, files, null);
        input.value = "";
      });
    }
    const tar = form.querySelector("[data-tar]");
    if (tar) tar.addEventListener("change", () => {
      if (tar.files[0]) send(card, null, tar.files[0]);
      tar.value = "";
    });
    const drop = form.querySelector("[data-drop]");
    if (drop) {
      drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
      drop.addEventListener("dragleave", () => drop.classList.remove("over"));
      drop.addEventListener("drop", (e) => {
        e.preventDefault();
        drop.classList.remove("over");
        const items = e.dataTransfer.items;
        const files = e.dataTransfer.files;
        const one = files.length === 1 && /\.tar$/i.test(files[0].name);
        if (one) { send(card, null, files[0]); return; }
        // Folders are walked where the browser offers entries; otherwise the files as given.
        dropped(items).then((list) => {
          if (!list.length) list = Array.from(files).map((f) => ({ file: f, path: f.name }));
          if (list.length) send(card, list, null);
        });
      });
    }
  }
  document.querySelectorAll(".claim").forEach(wireUpload);

  // --- live output: a stream while a view is open -----------------------------------------
  const MAX_LINES = 1000;
  document.addEventListener("toggle", (e) => {
    const d = e.target;
    if (!d.matches || !d.matches("details[data-logs]")) return;
    const pre = d.querySelector("[data-log]");
    if (d.open) {
      pre.textContent = "";
      const add = (lines) => {
        const at = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 4;
        pre.textContent += lines.map((l) => l + "\n").join("");
        const all = pre.textContent.split("\n");
        if (all.length > MAX_LINES) pre.textContent = all.slice(-MAX_LINES).join("\n");
        if (at) pre.scrollTop = pre.scrollHeight;
      };
      const es = new EventSource(d.getAttribute("data-logs"));
      es.addEventListener("recent", (m) => add(JSON.parse(m.data)));
      es.addEventListener("line", (m) => add([JSON.parse(m.data)]));
      es.addEventListener("error", () => { if (es.readyState === EventSource.CLOSED) add(["(the output ended)"]); });
      d._stream = es;
    } else if (d._stream) {
      d._stream.close();
      d._stream = null;
    }
  }, true);

  // --- confirmations --------------------------------------------------------------------------
  document.addEventListener("submit", (e) => {
    const q = e.target.getAttribute && e.target.getAttribute("data-confirm");
    if (q && !window.confirm(q)) e.preventDefault();
  });

  // --- the stream -----------------------------------------------------------------------------
  const stream = new EventSource("/ui/events");
  stream.addEventListener("claim", (e) => showClaim(JSON.parse(e.data)));
  stream.addEventListener("pools", (e) => showPools(JSON.parse(e.data)));
  stream.addEventListener("events", (e) => showEvents(JSON.parse(e.data)));
  stream.addEventListener("open", () => document.documentElement.setAttribute("data-live", "1"));
})();
