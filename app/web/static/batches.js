// The batch pages: the caller's batches, and one batch's counts, progress and cost, refreshed
// by polling the API while it runs, with its cancel and its results download.

import { saveBlob } from "./files.js";

const $ = (id) => document.getElementById(id);
const STATUSES = ["queued", "running", "succeeded", "failed", "canceled"];
const POLL_MS = 1000;
const LIST_LIMIT = 50;

export class BatchPages {
  constructor(api, randomKey) {
    this.api = api;
    this.randomKey = randomKey;
    this.batch = null; // the batch page's batch
    this.timer = null;
    this.generation = 0; // bumped when the page changes: an older poll's answer is dropped
    $("cancel-batch").addEventListener("click", () => this.cancel());
    $("download-batch").addEventListener("click", () => this.downloadResults());
    $("new-batch").addEventListener("submit", (event) => this.submit(event));
  }

  leave() {
    this.generation += 1;
    this.batch = null;
    clearTimeout(this.timer);
  }

  async showList() {
    this.leave();
    const generation = this.generation;
    $("batches-error").textContent = "";
    try {
      const page = await this.api.get(`/batches?limit=${LIST_LIMIT}`);
      if (generation !== this.generation) return;
      $("batch-rows").replaceChildren(...page.items.map(batchRow));
    } catch (error) {
      $("batches-error").textContent = `Could not load the batches: ${error.message}`;
    }
  }

  async showBatch(batchId) {
    this.leave();
    $("batch-error").textContent = "";
    $("batch-id").textContent = batchId;
    const generation = this.generation;
    await this.refresh(batchId, generation);
  }

  async refresh(batchId, generation) {
    let done = false;
    try {
      const batch = await this.api.get(`/batches/${batchId}`);
      if (generation !== this.generation) return;
      this.batch = batch;
      renderBatch(batch);
      done = batch.done;
      if ($("batch-error").dataset.kind === "sync") $("batch-error").textContent = "";
    } catch (error) {
      if (generation !== this.generation) return;
      $("batch-error").textContent = `Could not refresh this batch: ${error.message}`;
      $("batch-error").dataset.kind = "sync";
    }
    // Polled while it runs; a batch that is done changes no more.
    if (!done) this.timer = setTimeout(() => this.refresh(batchId, generation), POLL_MS);
  }

  async cancel() {
    const batch = this.batch;
    if (!batch) return;
    const button = $("cancel-batch");
    button.disabled = true;
    $("batch-error").textContent = "";
    try {
      const canceled = await this.api.post(`/batches/${batch.id}/cancel`);
      if (this.batch?.id === batch.id && canceled) renderBatch(canceled);
      // Running jobs stop a moment later: follow them until they have.
      clearTimeout(this.timer);
      this.generation += 1;
      await this.refresh(batch.id, this.generation);
    } catch (error) {
      $("batch-error").textContent = `Could not cancel the batch: ${error.message}`;
      $("batch-error").dataset.kind = "action";
      if (this.batch) renderBatch(this.batch);
    }
  }

  async downloadResults() {
    const batch = this.batch;
    if (!batch) return;
    const button = $("download-batch");
    button.disabled = true;
    try {
      const file = await this.api.download(`/batches/${batch.id}/results`, `batch-${batch.id}.jsonl`);
      saveBlob(file.blob, file.filename);
    } catch (error) {
      $("batch-error").textContent = `Could not download the results: ${error.message}`;
      $("batch-error").dataset.kind = "action";
    } finally {
      button.disabled = false;
    }
  }

  async submit(event) {
    event.preventDefault();
    const button = $("new-batch").querySelector("button[type=submit]");
    if (button.disabled) return;
    button.disabled = true;
    $("new-batch-error").textContent = "";
    try {
      const text = $("batch-items").value;
      const batch = await this.api.request("POST", "/batches", text, {
        "Content-Type": "application/jsonl",
        "Idempotency-Key": this.randomKey(),
      });
      $("batch-items").value = "";
      window.location.hash = `#/batches/${batch.id}`;
    } catch (error) {
      const errors = error.problem?.errors || [];
      const lines = errors.map((e) => `${e.field}: ${e.message}`);
      $("new-batch-error").textContent = [error.message, ...lines].join("\n");
    } finally {
      button.disabled = false;
    }
  }
}

function batchRow(batch) {
  const row = document.createElement("tr");
  row.dataset.batchId = batch.id;
  for (let i = 0; i < 5; i += 1) row.insertCell();
  const link = document.createElement("a");
  link.href = `#/batches/${batch.id}`;
  link.textContent = batch.id.slice(0, 8);
  row.cells[0].append(link);
  row.cells[1].textContent = batch.item_count;
  row.cells[2].textContent = batch.counts.succeeded;
  row.cells[3].textContent = `${Math.round(batch.progress.percent)}%`;
  row.cells[4].textContent = new Date(batch.created_at).toLocaleString();
  return row;
}

function renderBatch(batch) {
  const state = batch.done ? (batch.canceled_at ? "canceled" : "done") : "running";
  $("batch-state").textContent = state;
  $("batch-state").className = `status ${state === "done" ? "succeeded" : state}`;
  $("batch-progress").value = batch.progress.percent;
  $("batch-progress-text").textContent =
    `${batch.progress.finished} of ${batch.progress.total} finished · ${Math.round(batch.progress.percent)}%`;
  $("batch-items-count").textContent = batch.item_count;
  for (const status of STATUSES) $(`batch-count-${status}`).textContent = batch.counts[status];
  $("batch-cost").textContent = `$${batch.usage.cost_usd}`;
  $("batch-created").textContent = new Date(batch.created_at).toLocaleString();
  $("cancel-batch").disabled = batch.done;
}
