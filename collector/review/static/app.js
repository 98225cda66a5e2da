// Review page: vanilla JS, no build step, no external assets.
// The server is the source of truth: every action is a POST that returns the changed rows,
// which replace the cards in place (cards never jump away under the reviewer's eyes).
"use strict";

const $ = (sel) => document.querySelector(sel);
const PAGE_SIZE = 60;
const FILTER_DEFAULTS = {label: "", review: "all", status: "all", shop: "", min_suspect: "",
                         confident_only: "", text: "", group: "", title: "all", sort: "id"};

const state = {
  view: "grid",
  filters: {...FILTER_DEFAULTS},
  cursors: [null],         // keyset cursor of each page visited; [pageIndex] is the current one
  pageIndex: 0,
  items: [],
  total: 0,
  next: null,
  focus: 0,
  selected: new Set(),
  labels: [],
  groups: [],
  groupFocus: 0,
  groupNext: null,
  groupCursors: [null],
  groupPage: 0,
};

// ---------------------------------------------------------------- server
async function api(path, body) {
  const init = body === undefined ? {} : {  // JSON only: the server refuses other POSTs (CSRF)
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function toast(message, kind = "info") {
  const el = $("#toast");
  el.textContent = message;
  el.className = `show ${kind}`;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.className = ""; }, kind === "error" ? 6000 : 2500);
}

// ---------------------------------------------------------------- filters <-> URL hash
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  state.view = params.get("view") || "grid";
  for (const key of Object.keys(FILTER_DEFAULTS)) {
    state.filters[key] = params.get(key) ?? FILTER_DEFAULTS[key];
  }
}

function writeHash() {
  const params = new URLSearchParams();
  if (state.view !== "grid") params.set("view", state.view);
  for (const [key, value] of Object.entries(state.filters)) {
    if (value !== FILTER_DEFAULTS[key]) params.set(key, value);
  }
  history.replaceState(null, "", `#${params}`);
}

function syncControls() {
  const f = state.filters;
  $("#f-review").value = f.review;
  $("#f-status").value = f.status;
  $("#f-title").value = f.title;
  $("#f-shop").value = f.shop;
  $("#f-suspect").value = f.min_suspect || 0;
  $("#f-suspect-out").textContent = f.min_suspect ? Number(f.min_suspect).toFixed(2) : "off";
  $("#f-confident").checked = f.confident_only === "true";
  $("#f-text").value = f.text;
  $("#f-group").value = f.group;
  $("#f-sort").value = f.sort;
  document.querySelectorAll("#labels li").forEach((li) => {
    li.classList.toggle("active", li.dataset.label === f.label);
  });
  document.querySelectorAll("#views button").forEach((b) => {
    b.classList.toggle("active", b.dataset.view === state.view);
  });
}

function setFilter(changes) {
  // A changed select/checkbox/slider hands the keyboard back to the grid at once.
  if (document.activeElement?.matches("select, input[type=checkbox], input[type=range]")) {
    document.activeElement.blur();
  }
  Object.assign(state.filters, changes);
  state.cursors = [null];
  state.pageIndex = 0;
  state.focus = 0;
  state.selected.clear();
  writeHash();
  syncControls();
  loadPage();
}

// ---------------------------------------------------------------- summary / sidebar
async function loadSummary() {
  const s = await api("/api/summary");
  state.summary = s;
  const labels = await api("/api/labels");
  state.labels = labels.labels;
  const ul = $("#labels");
  ul.replaceChildren();
  const all = document.createElement("li");
  all.dataset.label = "";
  const todoAll = s.labels.reduce((n, l) => n + l.todo, 0);
  all.innerHTML = `<span>all labels</span><span class="n">${todoAll} / ${s.total}</span>`;
  ul.append(all);
  for (const l of s.labels) {
    const li = document.createElement("li");
    li.dataset.label = l.label;
    li.title = `${l.todo} not reviewed, ${l.approved} approved, ${l.rejected} rejected, ` +
               `${l.exported} will be exported`;
    li.innerHTML = `<span></span><span class="n">${l.todo} / ${l.total}</span>`;
    li.firstChild.textContent = l.label;
    ul.append(li);
  }
  ul.querySelectorAll("li").forEach((li) => li.addEventListener("click", () => {
    if (state.view !== "grid") setView("grid");
    setFilter({label: li.dataset.label});
  }));

  const shop = $("#f-shop");
  const current = state.filters.shop;
  shop.replaceChildren(new Option("all", ""));
  for (const row of s.shops) shop.append(new Option(`${row.shop || "(unknown)"} (${row.total})`, row.shop || ""));
  shop.value = current;

  const approved = s.labels.reduce((n, l) => n + l.approved, 0);
  const rejected = s.labels.reduce((n, l) => n + l.rejected, 0);
  const exported = s.labels.reduce((n, l) => n + l.exported, 0);
  $("#totals").innerHTML =
    `<span title="images with stored files">${s.total} images</span>` +
    `<span class="todo">${todoAll} to review</span>` +
    `<span class="approved">${approved} approved</span>` +
    `<span class="rejected">${rejected} rejected</span>` +
    `<span title="what collector export will write now">${exported} exported</span>`;
  $("#n-dup").textContent = s.groups.duplicate || "";
  $("#n-conflict").textContent = s.groups.conflict || "";
  $("#undo").disabled = !s.undoable;
  const info = $("#model-info");
  if (s.predictions) {
    const p = s.predictions;
    info.innerHTML = `<h2>Model</h2><p><b></b>: ${p.n} predictions, ` +
      `${p.confident} confident disagreements, ${new Date(p.at * 1000).toLocaleString()}</p>`;
    info.querySelector("b").textContent = p.model;
  } else {
    info.innerHTML = `<h2>Model</h2><p>No predictions yet. Rank likely label mistakes with<br>` +
      `<code>python -m collector.review.rank --manifest …</code><br>then sort by "most suspect first".</p>`;
  }
  syncControls();
}

// Counts scan the whole manifest (~0.2 s at 20,000 images): refresh once a burst of keys ends.
function refreshSummarySoon() {
  clearTimeout(refreshSummarySoon.timer);
  refreshSummarySoon.timer = setTimeout(() => loadSummary().catch((err) => toast(err.message, "error")), 400);
}

// ---------------------------------------------------------------- grid
async function loadPage() {
  if (state.view !== "grid") return loadGroups();
  const params = new URLSearchParams({limit: PAGE_SIZE});
  for (const [key, value] of Object.entries(state.filters)) if (value !== "") params.set(key, value);
  const cursor = state.cursors[state.pageIndex];
  if (cursor) params.set("cursor", cursor);
  let page;
  try {
    page = await api(`/api/images?${params}`);
  } catch (err) {
    toast(err.message, "error");
    return;
  }
  state.items = page.items;
  state.total = page.total;
  state.next = page.next_cursor;
  state.focus = Math.min(state.focus, Math.max(0, state.items.length - 1));
  renderGrid();
}

function renderGrid() {
  const grid = $("#grid");
  grid.hidden = false;
  $("#groups").hidden = true;
  grid.replaceChildren(...state.items.map(card));
  const start = state.pageIndex * PAGE_SIZE;
  $("#range").textContent = state.total
    ? `${start + 1}–${start + state.items.length} of ${state.total}` : "";
  $("#empty").hidden = state.items.length > 0;
  $("#prev").disabled = state.pageIndex === 0;
  $("#next").disabled = !state.next;
  renderFocus();
}

function card(item) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.id = item.id;
  fillCard(el, item);
  el.addEventListener("click", (event) => {
    if (event.target.closest("a")) return;
    const index = state.items.findIndex((i) => i.id === item.id);
    if (event.shiftKey || event.ctrlKey || event.metaKey) toggleSelect(item.id);
    state.focus = index;
    renderFocus();
  });
  el.addEventListener("dblclick", () => openViewer(item));
  return el;
}

function fillCard(el, item) {
  el.classList.toggle("approved", item.review_status === "approved");
  el.classList.toggle("rejected", item.review_status === "rejected");
  el.classList.toggle("selected", state.selected.has(item.id));
  el.dataset.status = item.review_status || "todo";
  el.dataset.label = item.effective_label;
  const badge = item.review_status === "approved" ? (item.review_label ? "moved" : "approved")
              : item.review_status === "rejected" ? "rejected" : "";
  const moved = item.review_label ? `<s class="from"></s> → ` : "";
  let prediction = "";
  if (item.predicted_label != null) {
    const agrees = item.predicted_label === item.effective_label;
    const suspect = item.suspect_score != null ? item.suspect_score.toFixed(2) : "";
    prediction = `<div class="pred ${agrees ? "agree" : item.confident ? "disagree strong" : "disagree"}"
      title="out-of-sample prediction; suspect score = 1 - p(label)">
      model: <b class="pred-label"></b> ${(item.predicted_prob * 100).toFixed(0)}%
      <span class="suspect">suspect ${suspect}</span></div>`;
  }
  const collectorNote = item.status === "duplicate" ? `duplicate of #${item.dup_of}`
                      : item.status === "conflict" ? `conflict: ${item.reason || ""}`
                      : item.status === "downloaded" ? "not deduplicated yet" : "";
  el.innerHTML = `
    <div class="thumb"><img loading="lazy" alt="" src="/api/images/${item.id}/thumb">
      ${badge ? `<span class="badge ${badge}">${badge}</span>` : ""}
      ${item.exported ? "" : `<span class="badge out" title="collector export leaves it out">not exported</span>`}
    </div>
    <div class="meta">
      <div class="label">${moved}<b class="to"></b> <span class="id">#${item.id}</span></div>
      ${prediction}
      <a class="title" target="_blank" rel="noreferrer noopener"></a>
      <div class="source"><a class="shop" target="_blank" rel="noreferrer noopener"></a>
        ${item.group_size > 1 ? `<span class="group" title="near-duplicate group: g shows it">group ${item.group_id} (${item.group_size})</span>` : ""}</div>
      ${collectorNote ? `<div class="note"></div>` : ""}
      ${item.title_verdict === "off_topic" ? `<div class="note off-topic" title="a title rule in sources.yaml says this title contradicts its label"></div>` : ""}
      ${Object.keys(item.attributes || {}).length ? `<div class="attrs"></div>` : ""}
      ${item.review_reason ? `<div class="reason"></div>` : ""}
    </div>`;
  // Untrusted text from the crawl goes in with textContent, never innerHTML.
  el.querySelector(".to").textContent = item.effective_label;
  if (item.review_label) el.querySelector(".from").textContent = item.label;
  if (item.predicted_label != null) el.querySelector(".pred-label").textContent = item.predicted_label;
  const title = el.querySelector(".title");
  title.textContent = item.product_title || "(no title)";
  title.title = item.product_title || "";
  if (safeUrl(item.product_url)) title.href = item.product_url;
  const shop = el.querySelector(".shop");
  shop.textContent = item.shop || "source";
  const source = safeUrl(item.product_url) || safeUrl(item.page_url) || safeUrl(item.url);
  if (source) shop.href = source;
  if (collectorNote) el.querySelector(".note").textContent = collectorNote;
  if (item.title_verdict === "off_topic") {
    el.querySelector(".off-topic").textContent = `off-topic title: ${item.title_rule || ""}`;
  }
  const group = el.querySelector(".group");
  if (group) {
    group.addEventListener("click", (event) => {
      event.stopPropagation();
      if (state.view !== "grid") setView("grid");
      setFilter({group: String(item.group_id), label: ""});
    });
  }
  if (item.review_reason) el.querySelector(".reason").textContent = item.review_reason;
  const attrs = el.querySelector(".attrs");
  if (attrs) {
    for (const [name, value] of Object.entries(item.attributes).sort()) {
      const span = document.createElement("span");
      const reviewed = name in (item.review_attributes || {});
      span.className = `attr${reviewed ? " reviewed" : ""}${value === "unknown" ? " unknown" : ""}`;
      span.dataset.attribute = name;
      span.textContent = `${name}: ${value}`;
      span.title = reviewed ? `set on review (title rules: ${item.rule_attributes[name] ?? "none"})`
                            : "from the title rules in sources.yaml (v to change)";
      attrs.append(span);
    }
  }
}

function safeUrl(url) {
  return url && /^https?:\/\//i.test(url) ? url : "";
}

function renderFocus() {
  const cards = document.querySelectorAll("#grid .card");
  cards.forEach((el, index) => {
    el.classList.toggle("focused", index === state.focus);
    el.classList.toggle("selected", state.selected.has(Number(el.dataset.id)));
  });
  const focused = cards[state.focus];
  if (focused) focused.scrollIntoView({block: "nearest"});
  $("#selection").textContent = state.selected.size ? `${state.selected.size} selected` : "";
}

function columns() {
  const cards = document.querySelectorAll("#grid .card");
  if (cards.length < 2) return 1;
  const top = cards[0].offsetTop;
  let n = 0;
  while (n < cards.length && cards[n].offsetTop === top) n++;
  return Math.max(1, n);
}

function moveFocus(delta) {
  if (!state.items.length) return;
  state.focus = Math.max(0, Math.min(state.items.length - 1, state.focus + delta));
  renderFocus();
}

function toggleSelect(id) {
  if (state.selected.has(id)) state.selected.delete(id); else state.selected.add(id);
  renderFocus();
}

function targets() {
  if (state.selected.size) return [...state.selected];
  const item = state.items[state.focus];
  return item ? [item.id] : [];
}

function replaceItems(changed) {
  for (const item of changed) {
    const index = state.items.findIndex((i) => i.id === item.id);
    if (index >= 0) {
      state.items[index] = item;
      const el = document.querySelector(`#grid .card[data-id="${item.id}"]`);
      if (el) fillCard(el, item);
    }
  }
}

async function act(action, extra = {}) {
  const ids = targets();
  if (!ids.length) return;
  const single = !state.selected.size;
  try {
    const result = await api("/api/actions", {action, ids, ...extra});
    replaceItems(result.changed);
    const n = result.changed.length;
    toast(n ? `${action.replace("_", " ")}: ${n} image${n > 1 ? "s" : ""} · u to undo`
            : action === "set_attribute" ? "nothing changed (already that value)"
            : "nothing changed (no model suggestion for these images)");
    state.selected.clear();
    if (single && n) moveFocus(1); else renderFocus();
    refreshSummarySoon();
  } catch (err) {
    toast(err.message, "error");
  }
}

async function undo() {
  try {
    const result = await api("/api/undo", {});
    if (state.view === "grid") {
      replaceItems(result.changed);
      const first = state.items.findIndex((i) => i.id === result.changed[0]?.id);
      if (first >= 0) { state.focus = first; renderFocus(); }
    } else {
      loadGroups();
    }
    toast(`undone: ${result.action.replace("_", " ")} on ${result.changed.length} image(s)`);
    refreshSummarySoon();
  } catch (err) {
    toast(err.message, "error");
  }
}

// ---------------------------------------------------------------- dialogs
function openReject() {
  const ids = targets();
  if (!ids.length) return;
  const dialog = $("#reject-dialog");
  dialog.querySelector(".count").textContent = ids.length > 1 ? `${ids.length} images` : `#${ids[0]}`;
  const input = $("#reject-reason");
  input.value = "";
  dialog.returnValue = "";
  dialog.showModal();
  input.focus();
}

$("#reject-dialog").addEventListener("close", () => {
  const reason = $("#reject-dialog").returnValue;
  if (reason) act("reject", {reason});
  $("#grid").focus();
});
$("#reject-reason").addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    event.preventDefault();
    const value = event.target.value.trim();
    if (value) $("#reject-dialog").close(value);
  } else if (/^[1-9]$/.test(event.key) && !event.target.value) {
    const buttons = $("#reject-dialog").querySelectorAll(".reasons button");
    const button = buttons[Number(event.key) - 1];
    if (button) { event.preventDefault(); $("#reject-dialog").close(button.value); }
  }
});

function openMove() {
  const ids = targets();
  if (!ids.length) return;
  const dialog = $("#move-dialog");
  dialog.querySelector(".count").textContent = ids.length > 1 ? `${ids.length} images` : `#${ids[0]}`;
  const input = $("#move-filter");
  input.value = "";
  state.moveChoice = 0;
  renderMoveLabels();
  dialog.returnValue = "";
  dialog.showModal();
  input.focus();
}

function moveCandidates() {
  const typed = $("#move-filter").value.trim().toLowerCase();
  const current = state.items[state.focus]?.effective_label;
  const list = state.labels.filter((l) => l.toLowerCase().includes(typed));
  // Exact match first, then prefix matches; the current label last (moving an image to
  // where it already is helps nobody).
  const rank = (l) => (l === current ? 3 : l.toLowerCase() === typed ? 0
                       : l.toLowerCase().startsWith(typed) ? 1 : 2);
  list.sort((a, b) => rank(a) - rank(b));
  if (typed && !state.labels.some((l) => l.toLowerCase() === typed)) list.push($("#move-filter").value.trim());
  return list;
}

function renderMoveLabels() {
  const ol = $("#move-labels");
  const list = moveCandidates();
  state.moveChoice = Math.min(state.moveChoice, Math.max(0, list.length - 1));
  ol.replaceChildren(...list.map((label, index) => {
    const li = document.createElement("li");
    li.textContent = state.labels.includes(label) ? label : `${label} (new label)`;
    li.dataset.label = label;
    li.classList.toggle("active", index === state.moveChoice);
    li.addEventListener("click", () => $("#move-dialog").close(label));
    return li;
  }));
}

$("#move-filter").addEventListener("input", () => { state.moveChoice = 0; renderMoveLabels(); });
$("#move-filter").addEventListener("keydown", (event) => {
  const list = moveCandidates();
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    event.preventDefault();
    state.moveChoice = (state.moveChoice + (event.key === "ArrowDown" ? 1 : -1) + list.length) % list.length;
    renderMoveLabels();
  } else if (event.key === "Enter") {
    event.preventDefault();
    if (list[state.moveChoice]) $("#move-dialog").close(list[state.moveChoice]);
  }
});
$("#move-dialog").addEventListener("close", () => {
  const label = $("#move-dialog").returnValue;
  if (label) act("relabel", {label});
  $("#grid").focus();
});

// Attribute values: every value seen for every attribute, plus what is typed
// ("colour=navy" or, with one attribute, just "navy"); "from title rules" drops the
// reviewer's value.
function openAttributes() {
  const ids = targets();
  if (!ids.length) return;
  if (!Object.keys(state.summary?.attributes || {}).length) {
    toast("no attributes in this manifest (attribute rules in sources.yaml add them)");
    return;
  }
  const dialog = $("#attr-dialog");
  dialog.querySelector(".count").textContent = ids.length > 1 ? `${ids.length} images` : `#${ids[0]}`;
  $("#attr-filter").value = "";
  state.attrChoice = 0;
  renderAttributeValues();
  dialog.returnValue = "";
  dialog.showModal();
  $("#attr-filter").focus();
}

function attributeCandidates() {
  const known = state.summary?.attributes || {};
  const names = Object.keys(known).sort();
  const typed = $("#attr-filter").value.trim().toLowerCase();
  const [typedName, typedValue] = typed.includes("=") ? typed.split("=", 2) : [null, typed];
  const list = [];
  for (const name of names) {
    if (typedName && !name.toLowerCase().startsWith(typedName)) continue;
    for (const value of [...Object.keys(known[name]).filter((v) => v !== "unknown").sort(), "unknown"]) {
      if (value.toLowerCase().includes(typedValue)) list.push({name, value});
    }
    if (!typedValue) list.push({name, value: null});
  }
  const rank = (c) => (c.value === null ? 3 : c.value.toLowerCase() === typedValue ? 0
                       : c.value.toLowerCase().startsWith(typedValue) ? 1 : 2);
  list.sort((a, b) => rank(a) - rank(b));
  const target = typedName ? names.find((n) => n.toLowerCase().startsWith(typedName))
                           : names.length === 1 ? names[0] : null;
  if (typedValue && target && !list.some((c) => c.name === target && c.value.toLowerCase() === typedValue)) {
    list.push({name: target, value: $("#attr-filter").value.trim().split("=").pop().trim(), fresh: true});
  }
  return list;
}

function renderAttributeValues() {
  const list = attributeCandidates();
  state.attrChoice = Math.min(state.attrChoice, Math.max(0, list.length - 1));
  $("#attr-values").replaceChildren(...list.map((c, index) => {
    const li = document.createElement("li");
    li.textContent = c.value === null ? `${c.name}: from title rules`
                   : `${c.name}: ${c.value}${c.fresh ? " (new value)" : ""}`;
    li.dataset.attribute = c.name;
    li.dataset.value = c.value ?? "";
    li.classList.toggle("active", index === state.attrChoice);
    li.addEventListener("click", () => { state.attrChoice = index; $("#attr-dialog").close("set"); });
    return li;
  }));
}

$("#attr-filter").addEventListener("input", () => { state.attrChoice = 0; renderAttributeValues(); });
$("#attr-filter").addEventListener("keydown", (event) => {
  const list = attributeCandidates();
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    event.preventDefault();
    state.attrChoice = (state.attrChoice + (event.key === "ArrowDown" ? 1 : -1) + list.length) % list.length;
    renderAttributeValues();
  } else if (event.key === "Enter") {
    event.preventDefault();
    if (list[state.attrChoice]) $("#attr-dialog").close("set");
  }
});
$("#attr-dialog").addEventListener("close", () => {
  if ($("#attr-dialog").returnValue === "set") {
    const choice = attributeCandidates()[state.attrChoice];
    if (choice) act("set_attribute", {attribute: choice.name, value: choice.value});
  }
  $("#grid").focus();
});

function openViewer(item) {
  if (!item) return;
  $("#viewer-img").src = `/api/images/${item.id}/file`;
  const meta = $("#viewer-meta");
  meta.textContent = `#${item.id} · ${item.effective_label} · ${item.width}×${item.height} · ` +
                     `${item.product_title || ""}`;
  $("#viewer").showModal();
}
$("#viewer").addEventListener("click", () => $("#viewer").close());

// ---------------------------------------------------------------- duplicate / conflict groups
function setView(view) {
  state.view = view;
  state.groupCursors = [null];
  state.groupPage = 0;
  state.groupFocus = 0;
  writeHash();
  syncControls();
  loadPage();
}

async function loadGroups() {
  $("#grid").hidden = true;
  $("#empty").hidden = true;
  const box = $("#groups");
  box.hidden = false;
  const params = new URLSearchParams({kind: state.view});
  const cursor = state.groupCursors[state.groupPage];
  if (cursor != null) params.set("cursor", cursor);
  const data = await api(`/api/groups?${params}`);
  state.groups = data.groups;
  state.groupNext = data.next_cursor;
  $("#prev").disabled = state.groupPage === 0;
  $("#next").disabled = data.next_cursor == null;
  $("#range").textContent = `${state.view === "conflict" ? "conflict" : "duplicate"} groups, page ${state.groupPage + 1}`;
  $("#selection").textContent = "";
  box.replaceChildren(...state.groups.map((group, index) => {
    const row = document.createElement("section");
    row.className = "group-row";
    row.dataset.group = group.group_id;
    row.classList.toggle("resolved", group.resolved);
    const head = document.createElement("h3");
    head.textContent = `group ${group.group_id} · ${group.members.length} images · ` +
      (group.conflict ? `labels: ${group.labels.join(", ")}` : group.labels[0]) +
      (group.resolved ? " · resolved" : "");
    const members = document.createElement("div");
    members.className = "members";
    group.members.forEach((item, n) => {
      const el = document.createElement("article");
      el.className = "card";
      el.dataset.id = item.id;
      fillCard(el, item);
      const keep = document.createElement("button");
      keep.className = "keep";
      keep.textContent = `Keep this (${n + 1})`;
      keep.title = "approve this image, reject the others in the group";
      keep.addEventListener("click", () => keepOne(group.group_id, item.id));
      el.append(keep);
      members.append(el);
    });
    row.append(head, members);
    row.addEventListener("click", () => { state.groupFocus = index; renderGroupFocus(); });
    return row;
  }));
  if (!state.groups.length) {
    box.innerHTML = `<p class="none">No ${state.view === "conflict" ? "conflicts" : "duplicate groups"}.</p>`;
  }
  renderGroupFocus();
}

function renderGroupFocus() {
  const rows = document.querySelectorAll("#groups .group-row");
  state.groupFocus = Math.max(0, Math.min(rows.length - 1, state.groupFocus));
  rows.forEach((row, index) => row.classList.toggle("focused", index === state.groupFocus));
  if (rows[state.groupFocus]) rows[state.groupFocus].scrollIntoView({block: "nearest"});
}

async function keepOne(groupId, imageId) {
  try {
    const result = await api(`/api/groups/${groupId}/keep`, {image_id: imageId});
    toast(`kept #${imageId}, rejected ${result.changed.length - 1} · u to undo`);
    await loadGroups();
    refreshSummarySoon();
  } catch (err) {
    toast(err.message, "error");
  }
}

// ---------------------------------------------------------------- keyboard
function onKey(event) {
  if (document.querySelector("dialog[open]")) {
    if (event.key === "Escape") return;  // the dialog closes itself
    if ($("#help").open || $("#viewer").open) {
      $("#help").open && $("#help").close();
      $("#viewer").open && $("#viewer").close();
      event.preventDefault();
    }
    return;
  }
  if (event.target.matches("input, select, textarea")) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (event.altKey && ["1", "2", "3"].includes(event.key)) {
    event.preventDefault();
    setView({1: "grid", 2: "duplicate", 3: "conflict"}[event.key]);
    return;
  }
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
    event.preventDefault();
    undo();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  const handled = state.view === "grid" ? gridKey(event, key) : groupKey(key);
  if (handled) event.preventDefault();
}

function gridKey(event, key) {
  switch (key) {
    case "ArrowRight": case "l": moveFocus(1); return true;
    case "ArrowLeft": case "h": moveFocus(-1); return true;
    case "ArrowDown": case "j": moveFocus(columns()); return true;
    case "ArrowUp": case "k": moveFocus(-columns()); return true;
    case "x": case " ": {
      const item = state.items[state.focus];
      if (item) toggleSelect(item.id);
      return true;
    }
    case "A":
      state.items.forEach((i) => state.selected.add(i.id));
      renderFocus();
      return true;
    case "a": act("approve"); return true;
    case "r": openReject(); return true;
    case "m": openMove(); return true;
    case "v": openAttributes(); return true;
    case "p": act("accept_suggestion"); return true;
    case "c": act("clear"); return true;
    case "u": undo(); return true;
    case "Enter": openViewer(state.items[state.focus]); return true;
    case "g": {
      const item = state.items[state.focus];
      if (item && item.group_id != null) setFilter({group: String(item.group_id), label: ""});
      return true;
    }
    case "n": case "PageDown": nextPage(); return true;
    case "b": case "PageUp": prevPage(); return true;
    case "/": $("#f-text").focus(); return true;
    case "?": $("#help").showModal(); return true;
    case "Escape":
      state.selected.clear();
      renderFocus();
      return true;
  }
  return false;
}

function groupKey(key) {
  if (/^[1-9]$/.test(key)) {
    const group = state.groups[state.groupFocus];
    const item = group && group.members[Number(key) - 1];
    if (item) keepOne(group.group_id, item.id);
    return true;
  }
  switch (key) {
    case "j": case "ArrowDown": state.groupFocus++; renderGroupFocus(); return true;
    case "k": case "ArrowUp": state.groupFocus--; renderGroupFocus(); return true;
    case "u": undo(); return true;
    case "n": case "PageDown": nextPage(); return true;
    case "b": case "PageUp": prevPage(); return true;
    case "?": $("#help").showModal(); return true;
  }
  return false;
}

function nextPage() {
  if (state.view !== "grid") {
    if (state.groupNext == null) return;
    state.groupCursors[state.groupPage + 1] = state.groupNext;
    state.groupPage++;
    state.groupFocus = 0;
    loadGroups();
    return;
  }
  if (!state.next) return;
  state.cursors[state.pageIndex + 1] = state.next;
  state.pageIndex++;
  state.focus = 0;
  state.selected.clear();
  loadPage().then(() => window.scrollTo(0, 0));
}

function prevPage() {
  if (state.view !== "grid") {
    if (state.groupPage === 0) return;
    state.groupPage--;
    loadGroups();
    return;
  }
  if (state.pageIndex === 0) return;
  state.pageIndex--;
  state.focus = 0;
  state.selected.clear();
  loadPage();
}

// ---------------------------------------------------------------- wiring
function wire() {
  document.addEventListener("keydown", onKey);
  $("#f-review").addEventListener("change", (e) => setFilter({review: e.target.value}));
  $("#f-status").addEventListener("change", (e) => setFilter({status: e.target.value}));
  $("#f-title").addEventListener("change", (e) => setFilter({title: e.target.value}));
  $("#f-shop").addEventListener("change", (e) => setFilter({shop: e.target.value}));
  $("#f-sort").addEventListener("change", (e) => setFilter({sort: e.target.value}));
  $("#f-confident").addEventListener("change", (e) => setFilter({confident_only: e.target.checked ? "true" : ""}));
  $("#f-suspect").addEventListener("input", (e) => {
    $("#f-suspect-out").textContent = Number(e.target.value) ? Number(e.target.value).toFixed(2) : "off";
  });
  $("#f-suspect").addEventListener("change", (e) => setFilter({min_suspect: Number(e.target.value) ? e.target.value : ""}));
  let typing;
  $("#f-text").addEventListener("input", (e) => {
    clearTimeout(typing);
    typing = setTimeout(() => setFilter({text: e.target.value.trim()}), 250);
  });
  $("#f-group").addEventListener("change", (e) => setFilter({group: e.target.value}));
  $("#f-reset").addEventListener("click", () => setFilter({...FILTER_DEFAULTS}));
  $("#prev").addEventListener("click", prevPage);
  $("#next").addEventListener("click", nextPage);
  $("#undo").addEventListener("click", undo);
  $("#help-button").addEventListener("click", () => $("#help").showModal());
  document.querySelectorAll("#views button").forEach((b) => b.addEventListener("click", () => setView(b.dataset.view)));
  document.querySelectorAll("#reject-dialog .reasons button").forEach((b) => {
    b.addEventListener("click", (event) => { event.preventDefault(); $("#reject-dialog").close(b.value); });
  });
}

async function start() {
  wire();
  readHash();
  syncControls();
  await loadSummary();
  await loadPage();
  document.body.dataset.ready = "true";
}

start().catch((err) => toast(err.message, "error"));
