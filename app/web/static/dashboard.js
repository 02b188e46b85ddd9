// The dashboard: sign in with an API key, submit jobs from forms generated from each kind's
// schema, watch the job list and a job's page live. No framework and no build step.
import { BatchPages } from "./batches.js";
import { CanvasView } from "./canvas-view.js";
import { CardView } from "./card-view.js";
import { EventType } from "./events.js";
import { dispositionFilename } from "./files.js";
import { Live } from "./live.js";
import { ImageView } from "./image-view.js";
import { FieldError, renderForm, showFieldErrors } from "./schema-form.js";

const KEY_STORAGE = "conveyor.apiKey";
const PAGE_SIZE = 20;
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const ACTIONS = ["cancel", "retry", "delete"];
const SUBMIT_ATTEMPTS = 5;
const GATEWAY_ERRORS = new Set([502, 503, 504]);
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class ApiError extends Error {
  constructor(status, problem, retryAfter) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
    this.retryAfter = retryAfter; // seconds, when the server said
  }
}

/** The request never got an answer (fetch rejects with a TypeError), or a gateway gave up. */
function isTransient(error) {
  if (error instanceof ApiError) return GATEWAY_ERRORS.has(error.status);
  return error instanceof TypeError;
}

function randomKey() {
  // Not crypto.randomUUID(): it exists only in secure contexts, and a dashboard served over
  // plain HTTP on a LAN address is not one. getRandomValues works everywhere.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

class Api {
  constructor(key) {
    this.key = key;
  }

  async request(method, path, body, headers = {}) {
    const response = await fetch(`/api/v1${path}`, {
      method,
      headers: {
        Authorization: `Bearer ${this.key}`,
        ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        ...headers,
      },
      // A string is sent as it is, with the Content-Type its caller names (JSON Lines).
      body: body === undefined || typeof body === "string" ? body : JSON.stringify(body),
    });
    if (response.status === 204) return null;
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const retryAfter = Number(response.headers.get("Retry-After")) || undefined;
      throw new ApiError(response.status, data, retryAfter);
    }
    return data;
  }

  /** A file the API sends (a download): its bytes and the name its Content-Disposition gives. */
  async download(path, fallbackName) {
    const response = await fetch(`/api/v1${path}`, {
      headers: { Authorization: `Bearer ${this.key}` },
    });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({}));
      throw new ApiError(response.status, problem);
    }
    const filename = dispositionFilename(response.headers.get("Content-Disposition"), fallbackName);
    return { blob: await response.blob(), filename };
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

  /**
   * Creates a job, once. A POST whose answer is lost (a proxy dropped the connection, the web
   * process restarted) may still have created the job, so each submission carries a key of its
   * own and repeats it when it retries: the server answers a repeat with the job it already
   * made (200, Idempotent-Replayed) instead of making a second one.
   */
  async createJob(body) {
    const headers = { "Idempotency-Key": randomKey() };
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this.request("POST", "/jobs", body, headers);
      } catch (error) {
        if (attempt === SUBMIT_ATTEMPTS || !isTransient(error)) throw error;
        const backoff = Math.min(8000, 500 * 2 ** (attempt - 1)) * (0.5 + Math.random());
        await sleep(error.retryAfter ? Math.min(error.retryAfter * 1000, 10000) : backoff);
      }
    }
  }
}

const state = {
  api: null,
  live: null,
  kinds: [],
  readForm: null,
  filters: { status: "", kind: "" },
  cursors: [null], // the cursor of each page shown so far
  page: 0,
  listRequest: 0, // the newest list request: an older answer arriving later is dropped
  rows: new Map(), // job id -> its table row
  job: null, // the job page's job
  card: null, // the job page's card view (character_card jobs)
  images: null, // the job page's images (image jobs)
  canvas: null, // the job page's canvas (canvas jobs)
  batches: null, // the batch pages
};

// --- sign in -------------------------------------------------------------------------------

async function signIn(key) {
  const api = new Api(key);
  await api.get("/jobs?limit=1"); // throws on a bad key
  const kinds = (await api.get("/kinds")).items;
  localStorage.setItem(KEY_STORAGE, key);
  state.api = api;
  state.kinds = kinds;
  state.card = new CardView(api);
  state.images = new ImageView(api);
  state.batches = new BatchPages(api, randomKey);
  state.live = new Live(api, {
    onState: showConnection,
    onOwnerEvent,
    onRowProgress: (jobId, progress) => {
      const row = state.rows.get(jobId);
      if (row) updateRow(row, undefined, progress);
    },
    refreshList: () => ($("home").hidden ? Promise.resolve(true) : refreshJobs()),
  });
  state.canvas = new CanvasView(api, state.live);
  state.live.start();
  $("sign-out").hidden = false;
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
  const button = form.querySelector("button[type=submit]");
  if (button.disabled) return; // this submission is still being posted
  button.disabled = true;
  $("new-job-error").textContent = "";
  try {
    const input = state.readForm();
    const job = await state.api.createJob({ kind: $("kind").value, input });
    window.location.hash = `#/jobs/${job.id}`;
  } catch (error) {
    const errors = error instanceof FieldError
      ? [{ field: error.field, message: error.detail }]
      : error.problem?.errors || [];
    const rest = showFieldErrors(form, errors);
    const lines = rest.map((e) => `${e.field}: ${e.message}`);
    if (!(error instanceof FieldError) && !errors.length) lines.unshift(error.message);
    $("new-job-error").textContent = lines.join("\n");
  } finally {
    button.disabled = false;
  }
}

// --- job list ------------------------------------------------------------------------------

/** Loads and shows a page of the list, or says above it why it could not; resolves to which. */
async function refreshJobs(page = state.page) {
  const params = new URLSearchParams({ limit: PAGE_SIZE });
  for (const [name, value] of Object.entries(state.filters)) if (value) params.set(name, value);
  if (state.cursors[page]) params.set("cursor", state.cursors[page]);
  const request = ++state.listRequest;
  try {
    const result = await state.api.get(`/jobs?${params}`);
    if (request === state.listRequest) showJobs(page, result);
  } catch (error) {
    if (request === state.listRequest) {
      $("list-error").textContent = `Could not load the jobs: ${error.message}`;
    }
    return false;
  }
  return true;
}

/** The key's spend today and this month against its budgets (GET /stats). */
async function refreshSpend() {
  try {
    const { budget } = await state.api.get("/stats");
    $("spend-today").textContent = spendText(budget.spent_today_usd, budget.daily_budget_usd, budget.remaining_today_usd);
    $("spend-month").textContent = spendText(budget.spent_month_usd, budget.monthly_budget_usd, budget.remaining_month_usd);
    $("spend-error").textContent = "";
  } catch (error) {
    $("spend-error").textContent = `Could not load the spend: ${error.message}`;
  }
}

function spendText(spent, limit, remaining) {
  if (limit === null) return `$${spent} (no limit)`;
  return `$${spent} of $${limit}, $${remaining} left`;
}

function showJobs(page, result) {
  $("list-error").textContent = "";
  state.cursors = state.cursors.slice(0, page + 1);
  state.cursors.push(result.next_cursor);
  state.page = page;
  const body = $("job-rows");
  body.replaceChildren();
  state.rows.clear();
  for (const job of result.items) body.append(jobRow(job));
  $("next-page").disabled = !result.next_cursor;
  $("first-page").disabled = page === 0;
  state.live.watchRows(unfinishedRows());
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
  if (status !== undefined) {
    row.cells[2].textContent = status;
    row.cells[2].className = `status ${status}`;
  }
  if (progress !== undefined) row.querySelector("progress").value = progress;
}

const EVENT_STATUS = {
  [EventType.QUEUED]: "queued",
  [EventType.STARTED]: "running",
  [EventType.RETRYING]: "queued",
  [EventType.SUCCEEDED]: "succeeded",
  [EventType.FAILED]: "failed",
  [EventType.CANCELED]: "canceled",
};

// What each state change does to a row's progress bar: a new attempt starts from zero.
const EVENT_PROGRESS = {
  [EventType.STARTED]: 0,
  [EventType.RETRYING]: 0,
  [EventType.SUCCEEDED]: 100,
};

function onOwnerEvent(event) {
  // The owner's room: every job of this key changing state, for the list.
  const row = state.rows.get(event.job_id);
  const status = EVENT_STATUS[event.type];
  if (row && (event.type === EventType.PROGRESS || event.type === EventType.PROVIDER_BATCH)) {
    updateRow(row, undefined, event.data.progress);
  } else if (row && status) {
    updateRow(row, status, EVENT_PROGRESS[event.type]);
    if (TERMINAL.has(status)) {
      state.live.watchRows(unfinishedRows());
      refreshSpend(); // what the job cost is in today's spend now
    }
  } else if (!row && event.type === EventType.QUEUED && state.page === 0 && !$("home").hidden) {
    refreshJobs(0); // a new job, perhaps from another tab: show it
  }
}

function unfinishedRows() {
  const unfinished = [...state.rows].filter(([, row]) => !TERMINAL.has(row.cells[2].textContent));
  return unfinished.map(([jobId]) => jobId);
}

// --- job page ------------------------------------------------------------------------------

async function showJob(jobId) {
  $("action-error").textContent = "";
  $("job-sync-error").textContent = "";
  const job = await state.api.get(`/jobs/${jobId}`);
  state.job = job;
  $("job-id").textContent = job.id;
  $("job-output").textContent = "";
  $("job-timeline").replaceChildren();
  $("job-logs").replaceChildren();
  state.card.reset(job);
  state.images.reset(job);
  state.canvas.reset(job);
  renderJob(job);
  state.card.showResult(job).catch(showSyncError);
  state.images.showResult(job);
  state.live.follow(jobId, (event) => applyEvent(jobId, event).catch(showSyncError));
  await loadLogs(jobId).catch(showSyncError);
}

function showSyncError(error) {
  // The page no longer matches the job: say so rather than show a stale state as current.
  $("job-sync-error").textContent = `Could not refresh this job: ${error.message}`;
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
  enableActions(job);
}

function enableActions(job) {
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
  if (event.type === EventType.OUTPUT_DELTA) {
    $("job-output").append(data.text);
    if (data.progress !== undefined) setProgress(Math.max($("job-progress").value, data.progress));
    return;
  }
  const item = document.createElement("li");
  item.textContent = `#${event.seq} ${new Date(event.at).toLocaleTimeString()} ${event.type}`;
  if (data.error) item.textContent += ` — ${data.error.code}: ${data.error.message}`;
  if (event.type === EventType.PROVIDER_BATCH) {
    item.textContent += ` — ${data.phase}`;
    if (data.total !== undefined) {
      item.textContent += ` (${data.completed ?? 0} done, ${data.failed ?? 0} failed of ${data.total})`;
    }
  }
  $("job-timeline").append(item);
  if (event.type === EventType.STEP) state.card.onStep(data);
  if (event.type === EventType.PROGRESS || event.type === EventType.PROVIDER_BATCH) {
    setProgress(data.progress);
  }
  if (event.type === EventType.STARTED) $("job-output").textContent = ""; // a new attempt's text
  if (event.type === EventType.LOG) loadLogs(jobId).catch(showSyncError);
  if (event.type in EVENT_STATUS) {
    const job = await state.api.get(`/jobs/${jobId}`);
    if (state.job?.id !== jobId) return;
    state.job = job;
    renderJob(job);
    $("job-sync-error").textContent = "";
    await state.card.showResult(job);
    state.images.showResult(job);
    state.canvas.showResult(job);
    if (event.type === EventType.SUCCEEDED && !$("job-output").textContent) {
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
  for (const name of ACTIONS) $(`${name}-job`).disabled = true; // one action at a time
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
    $("action-error").textContent = `Could not ${action} the job: ${error.message}`;
    if (state.job?.id === jobId) enableActions(state.job);
  }
}

// --- routing -------------------------------------------------------------------------------

function show(section) {
  for (const id of ["sign-in", "home", "job", "batches", "batch"]) $(id).hidden = id !== section;
}

async function route() {
  if (!state.api) return show("sign-in");
  const match = window.location.hash.match(/^#\/jobs\/([0-9a-f-]{36})$/);
  const batch = window.location.hash.match(/^#\/batches(?:\/([0-9a-f-]{36}))?$/);
  if (!match) {
    state.live.unfollow();
    state.images.leave();
    state.canvas.leave();
    state.job = null;
  }
  if (!batch) state.batches.leave();
  if (batch) {
    state.live.watchRows([]);
    show(batch[1] ? "batch" : "batches");
    await (batch[1] ? state.batches.showBatch(batch[1]) : state.batches.showList());
  } else if (match) {
    show("job");
    state.live.watchRows([]); // the list is hidden: its rows' deltas are not wanted
    try {
      await showJob(match[1]);
    } catch (error) {
      $("job-error").hidden = false;
      $("job-error").textContent = error.message;
    }
  } else {
    show("home");
    await Promise.all([refreshJobs(0), refreshSpend()]);
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
  refreshJobs(0);
});
$("next-page").addEventListener("click", () => refreshJobs(state.page + 1));
$("first-page").addEventListener("click", () => refreshJobs(0));
for (const action of ACTIONS) {
  $(`${action}-job`).addEventListener("click", () => jobAction(action));
}

const saved = localStorage.getItem(KEY_STORAGE);
if (saved) {
  signIn(saved).catch((error) => {
    show("sign-in");
    if (error.status === 401) return; // the saved key no longer works: ask for another
    $("sign-in-error").textContent = `Could not sign in: ${error.message}`;
  });
} else show("sign-in");
