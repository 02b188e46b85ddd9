// The dashboard: sign in with an API key, submit jobs from forms generated from each kind's
// schema, watch the job list and a job's page live. No framework and no build step.
import { Live } from "./live.js";
import { FieldError, renderForm, showFieldErrors } from "./schema-form.js";

const KEY_STORAGE = "conveyor.apiKey";
const PAGE_SIZE = 20;
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

class Api {
  constructor(key) {
    this.key = key;
  }

  async request(method, path, body) {
    const response = await fetch(`/api/v1${path}`, {
      method,
      headers: {
        Authorization: `Bearer ${this.key}`,
        ...(body === undefined ? {} : { "Content-Type": "application/json" }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 204) return null;
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  get(path) {
    return this.request("GET", path);
  }

  post(path, body) {
    return this.request("POST", path, body ?? {});
  }

  async token() {
    return (await this.post("/realtime/token")).token;
  }
}

const state = {
  api: null,
  live: null,
  kinds: [],
  readForm: null,
  filters: { status: "", kind: "" },
  cursors: [null], // the cursor of each page shown so far
  rows: new Map(), // job id -> its table row
  job: null, // the job page's job
};

// --- sign in -------------------------------------------------------------------------------

async function signIn(key) {
  const api = new Api(key);
  await api.get("/jobs?limit=1"); // throws on a bad key
  localStorage.setItem(KEY_STORAGE, key);
  state.api = api;
  state.live = new Live(api, { onState: showConnection, onOwnerEvent: onOwnerEvent });
  state.live.start();
  $("sign-out").hidden = false;
  state.kinds = (await api.get("/kinds")).items;
  setUpForm();
  route();
}

function showConnection(connection) {
  const el = $("connection");
  el.className = `connection ${connection}`;
  el.dataset.state = connection;
  el.textContent = connection;
}

// --- new job form --------------------------------------------------------------------------

function setUpForm() {
  const select = $("kind");
  const filter = $("filter-kind");
  select.replaceChildren();
  for (const kind of state.kinds) {
    select.add(new Option(kind.name, kind.name));
    filter.add(new Option(kind.name, kind.name));
  }
  const showKind = () => {
    const kind = state.kinds.find((k) => k.name === select.value);
    $("kind-description").textContent = kind.description;
    state.readForm = renderForm($("kind-fields"), kind.input_schema);
  };
  select.onchange = showKind;
  showKind();
}

async function submitJob(event) {
  event.preventDefault();
  const form = $("new-job");
  $("new-job-error").textContent = "";
  try {
    const input = state.readForm();
    const job = await state.api.post("/jobs", { kind: $("kind").value, input });
    window.location.hash = `#/jobs/${job.id}`;
  } catch (error) {
    const errors = error instanceof FieldError
      ? [{ field: error.field, message: error.detail }]
      : error.problem?.errors || [];
    const rest = showFieldErrors(form, errors);
    const lines = rest.map((e) => `${e.field}: ${e.message}`);
    if (!(error instanceof FieldError) && !errors.length) lines.unshift(error.message);
    $("new-job-error").textContent = lines.join("\n");
  }
}

// --- job list ------------------------------------------------------------------------------

async function loadJobs(page = 0) {
  const params = new URLSearchParams({ limit: PAGE_SIZE });
  for (const [name, value] of Object.entries(state.filters)) if (value) params.set(name, value);
  if (state.cursors[page]) params.set("cursor", state.cursors[page]);
  const result = await state.api.get(`/jobs?${params}`);
  state.cursors = state.cursors.slice(0, page + 1);
  state.cursors.push(result.next_cursor);
  state.page = page;
  const body = $("job-rows");
  body.replaceChildren();
  state.rows.clear();
  for (const job of result.items) body.append(jobRow(job));
  $("next-page").disabled = !result.next_cursor;
  $("first-page").disabled = page === 0;
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.jobId = job.id;
  row.innerHTML = `<td><a></a></td><td></td><td class="status"></td>
    <td><progress max="100"></progress></td><td></td>`;
  const link = row.querySelector("a");
  link.href = `#/jobs/${job.id}`;
  link.textContent = job.id.slice(0, 8);
  row.cells[1].textContent = job.kind;
  row.cells[4].textContent = new Date(job.created_at).toLocaleTimeString();
  updateRow(row, job.status, job.progress);
  state.rows.set(job.id, row);
  return row;
}

function updateRow(row, status, progress) {
  row.cells[2].textContent = status;
  row.cells[2].className = `status ${status}`;
  if (progress !== undefined) row.querySelector("progress").value = progress;
}

const EVENT_STATUS = {
  "job.queued": "queued",
  "job.started": "running",
  "job.retrying": "queued",
  "job.succeeded": "succeeded",
  "job.failed": "failed",
  "job.canceled": "canceled",
};

function onOwnerEvent(event) {
  // The owner's room: every job of this key changing state, for the list.
  const row = state.rows.get(event.job_id);
  const status = EVENT_STATUS[event.type];
  if (row && status) updateRow(row, status, status === "succeeded" ? 100 : undefined);
  else if (!row && event.type === "job.queued" && state.page === 0 && !$("home").hidden) {
    loadJobs(0); // a new job, perhaps from another tab: show it
  }
}

// --- job page ------------------------------------------------------------------------------

async function showJob(jobId) {
  const job = await state.api.get(`/jobs/${jobId}`);
  state.job = job;
  $("job-id").textContent = job.id;
  $("job-output").textContent = "";
  $("job-timeline").replaceChildren();
  renderJob(job);
  await loadLogs(jobId);
  state.live.follow(jobId, (event) => applyEvent(jobId, event));
}

function renderJob(job) {
  $("job-status").textContent = job.status;
  $("job-status").className = `status ${job.status}`;
  setProgress(job.progress);
  $("job-kind").textContent = job.kind;
  $("job-model").textContent = job.model || "—";
  $("job-attempts").textContent = `${job.attempt} of ${job.max_attempts}`;
  $("job-tokens").textContent = `${job.usage.tokens_in} in · ${job.usage.tokens_out} out`;
  $("job-cost").textContent = `$${job.usage.cost_usd}`;
  $("job-created").textContent = new Date(job.created_at).toLocaleString();
  $("job-finished").textContent = job.finished_at ? new Date(job.finished_at).toLocaleString() : "—";
  const error = $("job-error");
  error.hidden = !job.error;
  error.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("cancel-job").disabled = TERMINAL.has(job.status);
  $("retry-job").disabled = !TERMINAL.has(job.status);
  $("delete-job").disabled = !TERMINAL.has(job.status);
}

function setProgress(progress) {
  $("job-progress").value = progress;
  $("job-progress-text").textContent = `${Math.round(progress)}%`;
}

async function applyEvent(jobId, event) {
  if (state.job?.id !== jobId) return;
  const data = event.data || {};
  if (event.type === "job.output.delta") {
    $("job-output").append(data.text);
    if (data.progress !== undefined) setProgress(Math.max($("job-progress").value, data.progress));
    return;
  }
  const item = document.createElement("li");
  item.textContent = `#${event.seq} ${new Date(event.at).toLocaleTimeString()} ${event.type}`;
  if (data.error) item.textContent += ` — ${data.error.code}: ${data.error.message}`;
  $("job-timeline").append(item);
  if (event.type === "job.progress") setProgress(data.progress);
  if (event.type === "job.started") $("job-output").textContent = ""; // a new attempt's text
  if (event.type === "job.log") loadLogs(jobId);
  if (event.type in EVENT_STATUS) {
    const job = await state.api.get(`/jobs/${jobId}`);
    if (state.job?.id !== jobId) return;
    state.job = job;
    renderJob(job);
    if (event.type === "job.succeeded" && !$("job-output").textContent) {
      // Replayed from PostgreSQL after the stream expired: the stored output stands in.
      const output = data.output ?? (await state.api.get(`/jobs/${jobId}/result`)).output;
      $("job-output").textContent = output.text ?? JSON.stringify(output, null, 2);
    }
  }
}

async function loadLogs(jobId) {
  const logs = await state.api.get(`/jobs/${jobId}/logs`);
  $("job-logs").replaceChildren(
    ...logs.items.map((entry) => {
      const item = document.createElement("li");
      item.textContent = `${entry.level}: ${entry.message}`;
      return item;
    }),
  );
}

async function jobAction(action) {
  const jobId = state.job.id;
  $("action-error").textContent = "";
  try {
    if (action === "delete") {
      await state.api.request("DELETE", `/jobs/${jobId}`);
      window.location.hash = "#/";
    } else if (action === "retry") {
      const job = await state.api.post(`/jobs/${jobId}/retry`);
      window.location.hash = `#/jobs/${job.id}`;
    } else {
      renderJob(await state.api.post(`/jobs/${jobId}/cancel`));
    }
  } catch (error) {
    $("action-error").textContent = error.message;
  }
}

// --- routing -------------------------------------------------------------------------------

function show(section) {
  for (const id of ["sign-in", "home", "job"]) $(id).hidden = id !== section;
}

async function route() {
  if (!state.api) return show("sign-in");
  const match = window.location.hash.match(/^#\/jobs\/([0-9a-f-]{36})$/);
  if (match) {
    show("job");
    try {
      await showJob(match[1]);
    } catch (error) {
      $("job-error").hidden = false;
      $("job-error").textContent = error.message;
    }
  } else {
    state.live.unfollow();
    state.job = null;
    show("home");
    await loadJobs(0);
  }
}

window.addEventListener("hashchange", route);
$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await signIn($("api-key").value.trim());
  } catch (error) {
    $("sign-in-error").textContent = error.status === 401 ? "That key was not accepted." : error.message;
  }
});
$("sign-out").addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  window.location.reload();
});
$("new-job").addEventListener("submit", submitJob);
$("filters").addEventListener("change", (event) => {
  state.filters[event.target.name] = event.target.value;
  loadJobs(0);
});
$("next-page").addEventListener("click", () => loadJobs(state.page + 1));
$("first-page").addEventListener("click", () => loadJobs(0));
for (const action of ["cancel", "retry", "delete"]) {
  $(`${action}-job`).addEventListener("click", () => jobAction(action));
}

const saved = localStorage.getItem(KEY_STORAGE);
if (saved) signIn(saved).catch(() => show("sign-in"));
else show("sign-in");
