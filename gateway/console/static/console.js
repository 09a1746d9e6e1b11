// The gateway's console: every figure comes from the admin and usage APIs, called with the key given at sign-in
// (kept in sessionStorage: this tab only). Text from the server is always set as text, never parsed as HTML.
"use strict";

const KEY = "gateway.console.key";
const state = { key: sessionStorage.getItem(KEY), role: null, tenant: null };
const $ = (id) => document.getElementById(id);

// ---------- helpers ----------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    const detail = (body && body.error) || {};
    super(detail.message || `HTTP ${status}`);
    this.status = status;
    this.code = detail.code;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${state.key}`, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  let parsed = null;
  try { parsed = text ? JSON.parse(text) : null; } catch (_) { parsed = null; }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

const money = (value) => {
  if (value === null || value === undefined) return "–";
  const amount = Number(value);
  if (amount === 0) return "$0";
  if (Math.abs(amount) < 0.01) return "$" + amount.toPrecision(2);  // a few requests cost fractions of a cent
  return "$" + amount.toLocaleString("en-US", { maximumFractionDigits: Math.abs(amount) >= 100 ? 0 : 2 });
};
const count = (value) => (value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US"));
const percent = (value) => (value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%");
const compact = (value) => {
  if (value >= 1e9) return (value / 1e9).toFixed(1) + "G";
  if (value >= 1e6) return (value / 1e6).toFixed(1) + "M";
  if (value >= 1e3) return (value / 1e3).toFixed(1) + "k";
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
};

function toast(message) {
  const box = $("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 3500);
}

function stat(label, value, name) {
  return el("div", { class: "stat", "data-stat": name }, el("div", { class: "label", text: label }),
            el("div", { class: "value", text: value }));
}

function table(columns, rows, { empty = "nothing to show", name } = {}) {
  const head = el("tr", {}, columns.map((c) => el("th", { class: c.num ? "num" : null, text: c.title })));
  const body = rows.length
    ? rows.map((row) => el("tr", {}, columns.map((c) => {
        const value = c.cell(row);
        return el("td", { class: c.num ? "num" : null }, value instanceof Node ? value : String(value ?? "–"));
      })))
    : [el("tr", {}, el("td", { colspan: columns.length, class: "muted", text: empty }))];
  return el("div", { class: "scroll" }, el("table", { "data-table": name }, el("thead", {}, head), el("tbody", {}, body)));
}

function card(title, ...children) {
  return el("section", { class: "card" }, title ? el("h2", { text: title }) : null, ...children);
}

function failure(error) {
  return el("p", { class: "error", role: "alert", text: error.message || String(error) });
}

function monthStart() {
  const now = new Date();
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1)).toISOString().slice(0, 10);
}
const today = () => new Date().toISOString().slice(0, 10);

// ---------- sign-in ----------

async function signIn(key) {
  state.key = key;
  try {
    await api("/api/v1/status");
    state.role = "admin";
  } catch (error) {
    if (error.status !== 403) throw error;
    const account = await api("/v1/account");
    state.role = account.key.role === "member" ? "tenant" : account.key.role;  // tenant_admin, viewer
    state.tenant = account;
  }
  sessionStorage.setItem(KEY, key);
}

function signOut() {
  sessionStorage.removeItem(KEY);
  Object.assign(state, { key: null, role: null, tenant: null });
  location.hash = "";
  render();
}

const ADMIN_PAGES = [["overview", "Overview"], ["tenants", "Tenants"], ["requests", "Requests"],
                     ["audit", "Audit log"], ["fleet", "Fleet"], ["health", "Health"]];
const PAGES = {
  admin: ADMIN_PAGES,
  tenant: [["account", "Account"], ["usage", "Usage"], ["fine-tuning", "Fine-tuning"]],
  viewer: [["account", "Account"], ["usage", "Usage"], ["requests", "Requests"]],
  tenant_admin: [["account", "Account"], ["usage", "Usage"], ["manage", "Settings and keys"], ["requests", "Requests"],
                 ["audit", "Audit log"], ["fine-tuning", "Fine-tuning"]],
};

render.generation = 0;

function render() {
  const signedIn = Boolean(state.role);
  $("login").hidden = signedIn;
  $("view").hidden = !signedIn;
  $("nav").hidden = !signedIn;
  $("sign-out").hidden = !signedIn;
  if (!signedIn) { $("who").textContent = ""; return; }
  const pages = PAGES[state.role];
  const [page, ...rest] = (location.hash.slice(2) || pages[0][0]).split("/");
  $("nav").replaceChildren(...pages.map(([id, title]) =>
    el("a", { href: `#/${id}`, class: id === page ? "active" : null, "data-page": id, text: title })));
  $("who").textContent = state.role === "admin" ? "admin" : `${state.tenant.name} (${state.tenant.id})`;
  const view = $("view");
  view.replaceChildren(el("p", { class: "muted", text: "Loading…" }));
  const views = state.role === "admin" ? ADMIN_VIEWS : TENANT_VIEWS;
  const draw = (pages.some(([id]) => id === page) && views[page]) || (() => el("p", { text: "No such page." }));
  const generation = ++render.generation;  // a page still loading when another is opened is dropped
  Promise.resolve(draw(rest.map(decodeURIComponent))).then((content) => {
    if (generation !== render.generation) return;
    view.replaceChildren(content);
    view.dataset.page = page;
  }).catch((error) => { if (generation === render.generation) view.replaceChildren(failure(error)); });
}

// ---------- fine-tuning: the tenant's jobs, a job's loss curve ----------

const ACTIVE_JOB = new Set(["validating_files", "queued", "running"]);

async function upload(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file);
  const response = await fetch("/v1/files", { method: "POST", headers: { Authorization: `Bearer ${state.key}` },
                                              body: form });
  const parsed = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

// While a job is under way its page is drawn again every two seconds, as long as it is the page shown.
function refreshWhile(active) {
  if (!active) return;
  const shown = location.hash;
  setTimeout(() => { if (location.hash === shown) render(); }, 2000);
}

async function fineTuningJobs() {
  const [jobs, models] = await Promise.all([api("/v1/fine_tuning/jobs?limit=50"), api("/v1/models")]);
  const bases = models.data.filter((m) => !m.id.startsWith("ft:")).map((m) => m.id);
  const file = el("input", { type: "file", name: "file", accept: ".jsonl", required: true });
  const model = el("select", { name: "model" }, bases.map((id) => el("option", { value: id, text: id })));
  const epochs = el("input", { type: "number", name: "n_epochs", min: 1, max: 100, value: 3 });
  const suffix = el("input", { name: "suffix", placeholder: "suffix (optional)", pattern: "[A-Za-z0-9_\\-]+" });
  const start = el("form", { class: "row", "data-form": "fine-tune", onsubmit: async (event) => {
    event.preventDefault();
    try {
      const uploaded = await upload(file.files[0]);
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", body: {
        model: model.value, training_file: uploaded.id, hyperparameters: { n_epochs: Number(epochs.value) },
        ...(suffix.value ? { suffix: suffix.value } : {}) } });
      location.hash = `#/fine-tuning/${encodeURIComponent(job.id)}`;
    } catch (error) { toast(error.message); }
  } }, file, model, epochs, suffix, el("button", { type: "submit", text: "Start a job" }));
  refreshWhile(jobs.data.some((job) => ACTIVE_JOB.has(job.status)));
  return el("div", {}, el("h1", { text: "Fine-tuning" }),
    card("Train an adapter on your own examples (a JSONL file of chats)", start),
    card("Jobs", table([
      { title: "Job", cell: (j) => el("a", { href: `#/fine-tuning/${encodeURIComponent(j.id)}`, text: j.id }) },
      { title: "Base model", cell: (j) => j.model },
      { title: "Status", cell: (j) => el("span", { "data-status": j.status, text: j.status }) },
      { title: "Fine-tuned model", cell: (j) => j.fine_tuned_model || "–" },
      { title: "Started", cell: (j) => new Date(j.created_at * 1000).toISOString().slice(0, 16).replace("T", " ") },
    ], jobs.data, { name: "jobs", empty: "no fine-tuning jobs yet" })));
}

async function fineTuningJob(id) {
  const path = `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;
  const [job, events, checkpoints] = await Promise.all([api(path), api(`${path}/events?limit=1000`),
                                                        api(`${path}/checkpoints?limit=100`)]);
  const steps = events.data.filter((e) => e.type === "metrics").reverse();
  const curve = columnChart(steps.map((e) => ({ label: String(e.data.step), value: e.data.train_loss })),
                            { name: "loss", format: (v) => Number(v).toFixed(3) });
  const active = ACTIVE_JOB.has(job.status);
  const cancel = active ? el("button", { "data-action": "cancel", text: "Cancel the job", onclick: async () => {
    try { await api(`${path}/cancel`, { method: "POST" }); render(); } catch (error) { toast(error.message); }
  } }) : null;
  refreshWhile(active);
  return el("div", {}, el("h1", { text: job.id }),
    el("p", {}, el("a", { href: "#/fine-tuning", text: "All jobs" })),
    el("div", { class: "grid" }, stat("Status", job.status, "status"), stat("Base model", job.model, "model"),
       stat("Fine-tuned model", job.fine_tuned_model || "–", "fine_tuned_model"),
       stat("Trained tokens", count(job.trained_tokens), "trained_tokens")),
    job.error ? failure(new Error(job.error.message)) : null, cancel,
    card("Training loss by step", curve),
    card("Checkpoints", table([{ title: "Step", cell: (c) => c.step_number, num: true },
                               { title: "Training loss", cell: (c) => c.metrics.train_loss, num: true },
                               { title: "Validation loss", cell: (c) => c.metrics.valid_loss ?? "–", num: true }],
                              checkpoints.data, { name: "checkpoints", empty: "no checkpoint yet" })),
    card("Events", table([{ title: "When", cell: (e) => new Date(e.created_at * 1000).toISOString().slice(11, 19) },
                          { title: "Event", cell: (e) => e.message }], events.data.filter((e) => e.type !== "metrics"),
                         { name: "events" })));
}

// ---------- usage and routing, shared by the admin and tenant views ----------

function usageFigures(usage, routing) {
  const savings = usage.savings;
  return el("div", { class: "grid" },
    stat("Requests", count(usage.requests), "requests"),
    stat("Tokens", compact(usage.prompt_tokens + usage.completion_tokens), "tokens"),
    stat("Cost", money(usage.cost_usd), "cost"),
    stat("Small-model share", percent(usage.small_model_share), "small_model_share"),
    stat("Cascade rate", percent(usage.cascade_rate), "cascade_rate"),
    stat("Cache hit rate", percent(usage.cache_hit_rate), "cache_hit_rate"),
    stat(savings ? `Saved vs ${savings.reference_model}` : "Savings", savings ? money(savings.saved_usd) : "–", "saved"),
    stat("Limit refusals", count(usage.limit_refusals), "limit_refusals"),
    routing ? stat("Routed to large", percent(routing.large_share && routing.large_share.routed_to_large), "routed_to_large") : null);
}

function usageCharts(usage, routing) {
  const byDay = usage.by_day;
  const days = (field) => byDay.map((d) => ({ label: d.day.slice(5), value: d[field] }));
  const models = (field) => usage.by_model.map((m) => ({ label: m.model, value: m[field] }));
  const parts = [
    el("div", { class: "two" },
       card("Requests by day", charts.columnChart(days("requests"), { name: "requests_by_day", format: compact, whole: true })),
       card("Cost by day", charts.columnChart(days("cost_usd"), { name: "cost_by_day", color: "#8e44ad", format: money }))),
    el("div", { class: "two" },
       card("Tokens by day", charts.columnChart(days("tokens"), { name: "tokens_by_day", color: "#d35400", format: compact, whole: true })),
       card("Requests by model", charts.barList(models("requests"), { name: "requests_by_model", format: compact }))),
    el("div", { class: "two" },
       card("Cost by model", charts.barList(models("cost_usd"), { name: "cost_by_model", color: "#8e44ad", format: money })),
       routing ? card("Routed requests by complexity",
                      charts.columnChart(Object.entries(routing.by_complexity).map(([k, v]) => ({ label: k, value: v })),
                                         { name: "routing_by_complexity", color: "#16a085", format: compact, whole: true })) : null),
  ];
  if (routing) {
    parts.push(card("Routing: complexity and model", table([
      { title: "Complexity", cell: (r) => r.complexity }, { title: "Model", cell: (r) => r.model },
      { title: "Requests", num: true, cell: (r) => count(r.requests) },
      { title: "Cascaded", num: true, cell: (r) => count(r.cascaded) },
      { title: "Avg confidence", num: true, cell: (r) => (r.average_confidence ?? "–") },
      { title: "Cost", num: true, cell: (r) => money(r.cost_usd) }],
      routing.by_complexity_and_model, { name: "routing", empty: "no routed requests in this period" })));
  }
  if (usage.by_user && usage.by_user.length) {
    parts.push(card(`End users (${count(usage.end_users)})`, table([
      { title: "End user", cell: (r) => r.user }, { title: "Requests", num: true, cell: (r) => count(r.requests) },
      { title: "Limit refusals", num: true, cell: (r) => count(r.limit_refusals) },
      { title: "Tokens", num: true, cell: (r) => compact(r.tokens) }, { title: "Cost", num: true, cell: (r) => money(r.cost_usd) }],
      usage.by_user, { name: "by_user" })));
  }
  return parts;
}

function periodForm(values, onChange, extra = []) {
  const start = el("input", { type: "date", value: values.start, "data-field": "start" });
  const end = el("input", { type: "date", value: values.end, "data-field": "end" });
  return el("form", { class: "row", onsubmit: (event) => { event.preventDefault(); onChange(start.value, end.value); } },
            el("label", {}, "From", start), el("label", {}, "To", end), ...extra, el("button", { type: "submit", text: "Show" }));
}

// ---------- admin views ----------

const ADMIN_VIEWS = {
  async overview() {
    const box = el("div");
    const tenants = (await api("/api/v1/organizations")).data;
    const choice = el("select", { "data-field": "tenant" }, el("option", { value: "", text: "All tenants" }),
                      tenants.map((t) => el("option", { value: t.id, text: `${t.name} (${t.id})` })));
    const body = el("div");
    const show = async (start, end) => {
      body.replaceChildren(el("p", { class: "muted", text: "Loading…" }));
      const query = `?start=${start}&end=${end}`;
      const base = choice.value ? `/api/v1/organizations/${encodeURIComponent(choice.value)}` : "/api/v1";
      try {
        const [usage, routing] = await Promise.all([api(`${base}/usage${query}`), api(`${base}/routing${query}`)]);
        const parts = [usageFigures(usage, routing), ...usageCharts(usage, routing)];
        if (usage.by_tenant) {
          parts.push(card("Tenants by cost", table([
            { title: "Tenant", cell: (r) => r.tenant }, { title: "Requests", num: true, cell: (r) => count(r.requests) },
            { title: "Tokens", num: true, cell: (r) => compact(r.tokens) }, { title: "Cost", num: true, cell: (r) => money(r.cost_usd) },
            { title: "Limit refusals", num: true, cell: (r) => count(r.limit_refusals) }],
            usage.by_tenant.filter((r) => r.tenant), { name: "by_tenant" })));  // refused keys belong to no tenant
        }
        body.replaceChildren(...parts);
      } catch (error) { body.replaceChildren(failure(error)); }
    };
    const form = periodForm({ start: monthStart(), end: today() }, show, [el("label", {}, "Tenant", choice)]);
    box.append(el("h1", { text: "Overview" }), form, body);
    await show(monthStart(), today());
    return box;
  },

  async tenants(path) {
    if (path.length && path[0]) return tenantPage(path[0]);
    const all = (await api("/api/v1/organizations")).data;
    const search = el("input", { type: "search", placeholder: "id, name or tier", "data-field": "search" });
    const list = el("div");
    const draw = () => {
      const word = search.value.trim().toLowerCase();
      const shown = all.filter((t) => !word || [t.id, t.name, t.tier].some((v) => String(v).toLowerCase().includes(word)));
      list.replaceChildren(table([
        { title: "Tenant", cell: (t) => el("a", { href: `#/tenants/${encodeURIComponent(t.id)}`, text: t.name }) },
        { title: "Id", cell: (t) => t.id }, { title: "Tier", cell: (t) => t.tier },
        { title: "Profile", cell: (t) => (t.routing.auto ? t.routing.auto.profile : "–") },
        { title: "Monthly budget", num: true, cell: (t) => money(t.limits.monthly_budget_usd) },
        { title: "Source", cell: (t) => t.source },
        { title: "State", cell: (t) => el("span", { class: t.enabled ? "pill good" : "pill bad", text: t.enabled ? "enabled" : "disabled" }) },
      ], shown, { name: "tenants", empty: "no tenant matches" }));
    };
    search.addEventListener("input", draw);
    draw();
    const name = el("input", { required: true, "data-field": "new-name", maxlength: 200 });
    const id = el("input", { placeholder: "made from the name", "data-field": "new-id" });
    const tier = el("input", { value: "basic", "data-field": "new-tier", list: "tiers" });
    const tiers = el("datalist", { id: "tiers" }, [...new Set(["basic", "professional", "enterprise", ...all.map((t) => t.tier)])]
      .map((t) => el("option", { value: t })));
    const budget = el("input", { type: "number", min: 0, step: "any", "data-field": "new-budget" });
    const message = el("p", { role: "alert" });
    const create = el("form", { class: "row", "data-form": "create-tenant", onsubmit: async (event) => {
      event.preventDefault();
      const body = { name: name.value, tier: tier.value };
      if (id.value) body.id = id.value;
      if (budget.value) body.limits = { monthly_budget_usd: Number(budget.value) };
      try {
        const made = await api("/api/v1/organizations", { method: "POST", body });
        location.hash = `#/tenants/${encodeURIComponent(made.id)}`;
        toast(`Tenant ${made.id} created`);
      } catch (error) { message.replaceChildren(failure(error)); }
    } }, el("label", {}, "Name", name), el("label", {}, "Id", id), el("label", {}, "Tier", tier), tiers,
       el("label", {}, "Monthly budget ($)", budget), el("button", { type: "submit", text: "Create tenant" }));
    return el("div", {}, el("h1", { text: "Tenants" }), card("New tenant", create, message),
              card(null, el("div", { class: "toolbar" }, el("label", {}, "Search", search)), list));
  },

  async requests() {
    const ownRows = state.role !== "admin";  // a tenant's key reads its own tenant's rows only
    const tenant = el("input", { placeholder: "any", "data-field": "tenant", hidden: ownRows });
    const model = el("input", { placeholder: "any", "data-field": "model" });
    const status = el("input", { type: "number", placeholder: "any", min: 100, max: 599, "data-field": "status" });
    const body = el("div");
    let rows = [];
    const load = async (more) => {
      const query = new URLSearchParams({ limit: "100" });
      if (tenant.value) query.set("tenant", tenant.value);
      if (model.value) query.set("model", model.value);
      if (status.value) query.set("status", status.value);
      if (more && rows.length) query.set("before", rows[rows.length - 1].created_at);
      try {
        const page = await api(`/api/v1/requests?${query}`);
        rows = more ? rows.concat(page.data) : page.data;
        body.replaceChildren(table([
          { title: "Time (UTC)", cell: (r) => r.created_at.replace("T", " ").slice(0, 19) },
          { title: "Tenant", cell: (r) => r.tenant_id }, { title: "Key", cell: (r) => r.key_name },
          { title: "Route", cell: (r) => r.route }, { title: "Model", cell: (r) => r.model || r.model_requested },
          { title: "Status", cell: (r) => el("span", { class: r.status < 400 ? "pill good" : "pill bad", text: r.status }) },
          { title: "Tokens", num: true, cell: (r) => count((r.prompt_tokens || 0) + (r.completion_tokens || 0)) },
          { title: "Cost", num: true, cell: (r) => (r.cost_usd === null ? "–" : "$" + r.cost_usd.toFixed(6)) },
          { title: "Latency ms", num: true, cell: (r) => (r.latency_ms === null ? "–" : Math.round(r.latency_ms)) },
          { title: "Complexity", cell: (r) => r.complexity }, { title: "Cache", cell: (r) => (r.cache_hit ? "hit" : "") },
          { title: "Cascaded", cell: (r) => (r.cascaded ? "yes" : "") }, { title: "Error", cell: (r) => r.error_type },
          { title: "Guardrails", cell: (r) => (r.guardrails || []).map((g) => `${g.rule}: ${g.action}`).join(", ") },
        ], rows, { name: "requests", empty: "no request matches" }),
        page.has_more ? el("button", { class: "link", text: "Older requests", onclick: () => load(true) }) : null);
      } catch (error) { body.replaceChildren(failure(error)); }
    };
    const form = el("form", { class: "row", onsubmit: (event) => { event.preventDefault(); load(false); } },
                    ownRows ? tenant : el("label", {}, "Tenant", tenant), el("label", {}, "Model", model), el("label", {}, "Status", status),
                    el("button", { type: "submit", text: "Filter" }));
    await load(false);
    return el("div", {}, el("h1", { text: "Recent requests" }),
              el("p", { class: "muted", text: "From the usage ledger, newest first. The ledger keeps no prompt or answer text." }),
              form, card(null, body));
  },

  async audit() {
    const body = el("div");
    let rows = [];
    const describe = (value) => (value === null || value === undefined ? "–" : JSON.stringify(value));
    const load = async (more) => {
      const query = new URLSearchParams({ limit: "100" });
      if (more && rows.length) query.set("before_id", rows[rows.length - 1].id);
      try {
        const page = await api(`/api/v1/audit?${query}`);
        rows = more ? rows.concat(page.data) : page.data;
        body.replaceChildren(table([
          { title: "Time (UTC)", cell: (r) => r.created_at.replace("T", " ").slice(0, 19) },
          { title: "Who", cell: (r) => (r.actor.tenant ? `${r.actor.name} (${r.actor.role} of ${r.actor.tenant})` : `${r.actor.name} (${r.actor.role})`) },
          { title: "Action", cell: (r) => r.action }, { title: "Tenant", cell: (r) => r.tenant },
          { title: "Target", cell: (r) => r.target },
          { title: "Before", cell: (r) => el("code", { class: "clip", text: describe(r.before) }) },
          { title: "After", cell: (r) => el("code", { class: "clip", text: describe(r.after) }) },
        ], rows, { name: "audit", empty: "no change yet" }),
        page.has_more ? el("button", { class: "link", text: "Older changes", onclick: () => load(true) }) : null);
      } catch (error) { body.replaceChildren(failure(error)); }
    };
    await load(false);
    return el("div", {}, el("h1", { text: "Audit log" }),
              el("p", { class: "muted", text: "Every change made through the admin API: who, what, when, before and after." }),
              card(null, body));
  },

  async fleet() {
    const status = await api("/api/v1/status");  // asked first: no fleet is no error (nor a 404 in the console)
    if (!status.fleet) {
      return el("div", {}, el("h1", { text: "Fleet" }), card(null, el("p", {
        text: "This gateway has no fleet: declare pools of vLLM nodes under fleet: in models.yaml." })));
    }
    const fleet = await api("/api/v1/fleet");
    const pools = Object.entries(fleet.pools).map(([name, pool]) => card(`${name} (${pool.model})`, table([
      { title: "Node", cell: (n) => n.name }, { title: "URL", cell: (n) => n.url },
      { title: "State", cell: (n) => el("span", { class: n.state === "up" ? "pill good" : "pill bad", text: n.drained_by_admin ? "drained by admin" : n.state }) },
      { title: "Running", num: true, cell: (n) => n.num_running }, { title: "Waiting", num: true, cell: (n) => n.num_waiting },
      { title: "In flight", num: true, cell: (n) => n.inflight }, { title: "KV cache", num: true, cell: (n) => percent(n.kv_cache_usage) },
      { title: "Adapters", cell: (n) => `${n.adapters.length}${n.slots ? " / " + n.slots : ""}` },
      { title: "Running adapters", cell: (n) => n.running_adapters.join(", ") },
    ], pool.nodes, { name: "fleet", empty: "no node" })));
    return el("div", {}, el("h1", { text: "Fleet" }), el("p", { class: "muted", text: `Placement: ${fleet.strategy}` }), ...pools);
  },

  async health() {
    const status = await api("/api/v1/status");
    const flags = (object) => Object.entries(object).map(([name, ok]) =>
      el("span", { class: ok ? "pill good" : "pill bad", "data-health": name, text: `${name}: ${ok ? "ok" : "down"}` }));
    return el("div", {}, el("h1", { text: "Health" }),
      card("Stores", el("div", { class: "toolbar" }, flags(status.stores))),
      card("Readiness", el("div", { class: "toolbar" }, flags(status.ready))),
      status.fleet ? card("Fleet", el("p", { text: `${status.fleet.up} of ${status.fleet.nodes} nodes up` })) : null,
      card("Deployments", table([
        { title: "Model", cell: (d) => d.model }, { title: "Deployment", cell: (d) => d.deployment },
        { title: "Provider", cell: (d) => d.provider }, { title: "Standby", cell: (d) => (d.standby ? "yes" : "") },
        { title: "Failures in a row", num: true, cell: (d) => d.failures_in_a_row },
        { title: "Cooldown left (s)", num: true, cell: (d) => d.cooldown_seconds_left },
      ], status.deployments, { name: "deployments" })));
  },
};

async function tenantPage(id) {
  const path = `/api/v1/organizations/${encodeURIComponent(id)}`;
  const [tenant, keys, usage] = await Promise.all([api(path), api(`${path}/keys`),
                                                   api(`${path}/usage?start=${monthStart()}&end=${today()}`)]);
  const fromFile = tenant.source !== "api";
  const operator = state.role === "admin";  // a tenant_admin key sets its settings; its tier and models are the operator's
  const limits = tenant.limits;
  const field = (name, value, attributes = {}) => el("input", { value: value ?? "", "data-field": name, disabled: fromFile, ...attributes });
  const inputs = {
    tier: field("tier", tenant.tier, { disabled: fromFile || !operator }),
    requests_per_minute: field("requests_per_minute", limits.requests_per_minute, { type: "number", min: 0 }),
    tokens_per_minute: field("tokens_per_minute", limits.tokens_per_minute, { type: "number", min: 0 }),
    concurrent_requests: field("concurrent_requests", limits.concurrent_requests, { type: "number", min: 0 }),
    monthly_budget_usd: field("monthly_budget_usd", limits.monthly_budget_usd, { type: "number", min: 0, step: "any" }),
    models: field("models", tenant.models.join(", "), { placeholder: "every model of the tier", disabled: fromFile || !operator }),
    profile: field("profile", tenant.routing.auto ? tenant.routing.auto.profile : "", { placeholder: "by industry" }),
  };
  const cache = el("textarea", { "data-field": "cache", disabled: fromFile }, JSON.stringify(tenant.cache || {}, null, 1));
  const guardrails = el("textarea", { "data-field": "guardrails", disabled: fromFile }, JSON.stringify(tenant.guardrails || [], null, 1));
  const endUsers = el("textarea", { "data-field": "end_users", disabled: fromFile }, JSON.stringify(tenant.end_users || {}, null, 1));
  const adapters = el("textarea", { "data-field": "adapters", disabled: fromFile },
                      JSON.stringify(Object.fromEntries(Object.entries(tenant.adapters || {}).map(([k, a]) =>
                        [k, { base: a.base, path: a.path, default: a.default || undefined }])), null, 1));
  const message = el("div", { role: "alert" });
  const number = (input) => (input.value === "" ? null : Number(input.value));
  const changed = (input, before) => String(input.value) !== String(before ?? "");
  const save = el("form", { "data-form": "edit-tenant", onsubmit: async (event) => {
    event.preventDefault();
    try {
      const body = {};  // only what was changed: the rest keeps its value (an emptied limit goes back to the tier's)
      if (changed(inputs.tier, tenant.tier)) body.tier = inputs.tier.value;
      const limitsChanged = {};
      for (const name of ["requests_per_minute", "tokens_per_minute", "concurrent_requests", "monthly_budget_usd"]) {
        if (changed(inputs[name], limits[name])) limitsChanged[name] = number(inputs[name]);
      }
      if (Object.keys(limitsChanged).length) body.limits = limitsChanged;
      if (changed(inputs.models, tenant.models.join(", "))) {
        body.models = inputs.models.value.trim() ? inputs.models.value.split(",").map((m) => m.trim()).filter(Boolean) : null;
      }
      if (changed(inputs.profile, tenant.routing.auto ? tenant.routing.auto.profile : "")) {
        body.routing = inputs.profile.value ? { profile: inputs.profile.value } : null;
      }
      if (cache.value !== cache.defaultValue) body.cache = JSON.parse(cache.value || "{}");
      if (adapters.value !== adapters.defaultValue) body.adapters = JSON.parse(adapters.value || "{}");
      if (guardrails.value !== guardrails.defaultValue) body.guardrails = JSON.parse(guardrails.value || "[]");
      if (endUsers.value !== endUsers.defaultValue) {
        const parsed = JSON.parse(endUsers.value || "{}");
        body.end_users = Object.keys(parsed).length ? parsed : null;
      }
      await api(path, { method: "PATCH", body });
      toast("Saved");
      render();
    } catch (error) { message.replaceChildren(failure(error)); }
  } },
    el("div", { class: "form row" }, Object.entries(inputs).map(([name, input]) => el("label", {}, name.replaceAll("_", " "), input))),
    el("div", { class: "two" }, el("label", {}, "cache policy (JSON)", cache), el("label", {}, "adapters (JSON)", adapters)),
    el("div", { class: "two" }, el("label", {}, "guardrails (JSON)", guardrails), el("label", {}, "end users' limits (JSON)", endUsers)),
    fromFile ? el("p", { class: "muted", text: "Declared in tenants.yaml: change it there." })
             : el("p", {}, el("button", { type: "submit", text: "Save" })), message);

  const newKey = el("div");
  const keyName = el("input", { "data-field": "key-name", placeholder: "backend" });
  const expires = el("input", { type: "date", "data-field": "key-expires" });
  const role = el("select", { "data-field": "key-role" }, ["member", "viewer", "tenant_admin"].map((r) => el("option", { value: r, text: r })));
  const keyForm = el("form", { class: "row", "data-form": "create-key", onsubmit: async (event) => {
    event.preventDefault();
    try {
      const made = await api(`${path}/keys`, { method: "POST", body: { name: keyName.value || undefined, expires: expires.value || undefined, role: role.value } });
      newKey.replaceChildren(el("p", { text: `Key ${made.name}: copy it now; it is not shown again.` }),
                             el("div", { class: "secret", "data-secret": "key", text: made.key }));
      keyList.replaceChildren(keysTable((await api(`${path}/keys`)).data));
    } catch (error) { newKey.replaceChildren(failure(error)); }
  } }, el("label", {}, "Name", keyName), el("label", {}, "Expires", expires), el("label", {}, "Role", role),
     el("button", { type: "submit", text: "Make a key" }));
  const keysTable = (rows) => table([
    { title: "Name", cell: (k) => k.name }, { title: "Source", cell: (k) => k.source },
    { title: "Role", cell: (k) => k.role },
    { title: "Limited to", cell: (k) => ["routes", "models", "tools"].filter((f) => k[f]).map((f) => `${f}: ${k[f].join(", ")}`).join("; ") },
    { title: "Expires", cell: (k) => k.expires_at || "never" },
    { title: "", cell: (k) => (k.source === "api" ? el("button", { class: "danger", "data-revoke": k.name, text: "Revoke", onclick: async () => {
      if (!confirm(`Revoke the key ${k.name}? Clients using it stop working at once.`)) return;
      try {
        await api(`${path}/keys/${encodeURIComponent(k.name)}`, { method: "DELETE" });
        toast(`Key ${k.name} revoked`);
        keyList.replaceChildren(keysTable((await api(`${path}/keys`)).data));
      } catch (error) { newKey.replaceChildren(failure(error)); }
    } }) : "") },
  ], rows, { name: "keys", empty: "no key" });
  const keyList = el("div", {}, keysTable(keys.data));

  const providerMessage = el("div", { role: "alert" });
  const provider = el("input", { "data-field": "provider", placeholder: "openai, anthropic, ..." });
  const providerKey = el("input", { type: "password", "data-field": "provider-key", autocomplete: "off" });
  const providerForm = el("form", { class: "row", "data-form": "provider-key", onsubmit: async (event) => {
    event.preventDefault();
    try {
      await api(`${path}/provider-keys/${encodeURIComponent(provider.value.trim())}`, { method: "PUT", body: { key: providerKey.value } });
      providerKey.value = "";
      toast(`Key for ${provider.value} kept in Vault`);
      render();
    } catch (error) { providerMessage.replaceChildren(failure(error)); }
  } }, el("label", {}, "Provider", provider), el("label", {}, "Its key", providerKey),
     el("button", { type: "submit", text: "Keep in Vault" }));
  const providers = Object.entries(tenant.provider_keys || {});
  const providerCard = card("Own provider keys",
    providers.length ? table([{ title: "Provider", cell: (r) => r[0] }, { title: "Kept at", cell: (r) => r[1] }],
                             providers, { name: "provider_keys" }) : el("p", { class: "muted", text: "The gateway's own keys are used." }),
    fromFile ? null : providerForm, providerMessage);

  return el("div", {}, el("h1", { text: `${tenant.name} (${tenant.id})` }),
            el("p", {}, operator ? el("a", { href: "#/tenants", text: "All tenants" }) : null, operator ? " · " : null,
               el("span", { class: "muted", text: `${tenant.source} · allowed models: ${tenant.allowed_models.join(", ")}` })),
            card("This month", usageFigures(usage, null)), card("Settings", save),
            card("Keys", keyForm, newKey, keyList), providerCard);
}

// ---------- tenant views ----------

const TENANT_VIEWS = {
  manage: () => tenantPage(state.tenant.id),
  "fine-tuning": (rest) => (rest[0] ? fineTuningJob(rest[0]) : fineTuningJobs()),
  requests: () => ADMIN_VIEWS.requests(),
  audit: () => ADMIN_VIEWS.audit(),

  async account() {
    const account = await api("/v1/account");
    state.tenant = account;
    const budget = account.budget;
    const used = budget.monthly_budget_usd ? Math.min(1, (budget.spent_usd || 0) / budget.monthly_budget_usd) : null;
    return el("div", {}, el("h1", { text: `${account.name}` }),
      el("div", { class: "grid" }, stat("Tier", account.tier, "tier"),
         stat(`Spent in ${budget.month}`, money(budget.spent_usd), "spent"),
         stat("Budget left", budget.monthly_budget_usd === null ? "no budget" : money(budget.left_usd), "budget_left")),
      used === null ? null : card("Monthly budget", el("div", { class: "bar" }, el("div", { style: `width:${(100 * used).toFixed(1)}%` })),
                                  el("p", { class: "muted", text: `${money(budget.spent_usd)} of ${money(budget.monthly_budget_usd)}` })),
      card("Limits", table([{ title: "Limit", cell: (r) => r[0].replaceAll("_", " ") },
                            { title: "Value", num: true, cell: (r) => (r[1] === null ? "none" : count(r[1])) }],
                           Object.entries(account.limits), { name: "limits" })),
      card("Models", el("p", { text: account.models.join(", ") })),
      card("Keys", table([{ title: "Name", cell: (k) => k.name }, { title: "Expires", cell: (k) => k.expires_at || "never" }],
                         account.keys, { name: "keys", empty: "no key" })));
  },

  async usage() {
    const body = el("div");
    const show = async (start, end) => {
      const query = `?start=${start}&end=${end}`;
      try {
        const [usage, routing] = await Promise.all([api(`/v1/usage${query}`), api(`/v1/routing/stats${query}`)]);
        body.replaceChildren(usageFigures(usage, routing), ...usageCharts(usage, routing));
      } catch (error) { body.replaceChildren(failure(error)); }
    };
    await show(monthStart(), today());
    return el("div", {}, el("h1", { text: "Usage" }), periodForm({ start: monthStart(), end: today() }, show), body);
  },
};

// ---------- start ----------

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    await signIn($("login-key").value.trim());
    $("login-key").value = "";
    location.hash = `#/${PAGES[state.role][0][0]}`;
    render();
  } catch (error) {
    state.key = null;
    $("login-error").textContent = error.status === 401 ? "This key is not valid." : error.message;
  }
});
$("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", render);

(async () => {
  if (state.key) {
    try { await signIn(state.key); } catch (_) { sessionStorage.removeItem(KEY); state.key = null; }
  }
  render();
})();
