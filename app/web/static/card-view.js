// A `character_card` job's page: its steps as they run (job.step events), then the card's
// fields, greetings and lorebook, the cost of each step, and its downloads. Every text of the
// card is model output, so it is only ever set as textContent.

import { saveBlob } from "./files.js";

export const CARD_KIND = "character_card";
const $ = (id) => document.getElementById(id);
const EXTENSION = { json: "json", card_v2: "json", png: "png" };

function sumUsd(values) {
  // Decimal strings with 8 places: summed in units of 1e-8 dollars to stay exact.
  const units = values.reduce((total, value) => total + Math.round(Number(value) * 1e8), 0);
  return (units / 1e8).toFixed(8);
}

export class CardView {
  constructor(api) {
    this.api = api;
    this.jobId = null;
    this.steps = new Map(); // step name -> its table row
    this.shown = null; // the job id whose card is on the page
    this.loading = null;
    for (const button of $("card-downloads").querySelectorAll("button[data-format]")) {
      button.addEventListener("click", () => this.download(button.dataset.format, button));
    }
  }

  /** Shows the section for a card job, empty; hides it for any other kind. */
  reset(job) {
    this.jobId = job.id;
    this.steps.clear();
    this.shown = null;
    this.loading = null;
    $("card-view").hidden = job.kind !== CARD_KIND;
    $("card-steps").replaceChildren();
    $("card-result").hidden = true;
    $("download-error").textContent = "";
  }

  get active() {
    return !$("card-view").hidden;
  }

  stepRow(step) {
    let row = this.steps.get(step);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.step = step;
      for (let i = 0; i < 4; i += 1) row.insertCell();
      row.cells[0].textContent = step;
      row.cells[1].className = "status";
      this.steps.set(step, row);
      $("card-steps").append(row);
    }
    return row;
  }

  /** A job.step event: started, finished (with its cost) or reused (an earlier attempt's). */
  onStep(data) {
    if (!this.active) return;
    const row = this.stepRow(data.step);
    row.dataset.status = data.status;
    row.cells[1].textContent = data.status === "reused" ? `reused (attempt ${data.attempt})` : data.status;
    row.cells[1].className = `status ${data.status}`;
    if (data.tokens_in !== undefined) {
      row.cells[2].textContent = `${data.tokens_in} in · ${data.tokens_out} out`;
    }
    if (data.cost_usd !== undefined) row.cells[3].textContent = `$${data.cost_usd}`;
  }

  /** Once the job has succeeded: the card, and each step's cost from its recorded calls. */
  async showResult(job) {
    if (!this.active || job.id !== this.jobId || job.status !== "succeeded") return;
    if (this.shown === job.id || this.loading === job.id) return;
    this.loading = job.id;
    try {
      const [result, calls] = await Promise.all([
        this.api.get(`/jobs/${job.id}/result`),
        this.api.get(`/jobs/${job.id}/calls`),
      ]);
      if (this.jobId !== job.id) return;
      this.fillCosts(calls.items);
      this.renderCard(result.output?.data ?? result.output ?? {});
      this.shown = job.id;
    } finally {
      if (this.loading === job.id) this.loading = null;
    }
  }

  fillCosts(calls) {
    // The events already gave each step's cost; the calls fill in what they did not (a feed
    // whose stream expired, a step whose event was missed).
    const byStep = new Map();
    for (const call of calls) {
      if (!call.step) continue;
      if (!byStep.has(call.step)) byStep.set(call.step, []);
      byStep.get(call.step).push(call.cost_usd);
    }
    for (const [step, costs] of byStep) {
      const row = this.stepRow(step);
      if (!row.cells[3].textContent) row.cells[3].textContent = `$${sumUsd(costs)}`;
      if (!row.dataset.status) {
        row.dataset.status = "finished";
        row.cells[1].textContent = "finished";
        row.cells[1].className = "status finished";
      }
    }
  }

  renderCard(card) {
    $("card-name").textContent = card.name ?? "";
    $("card-description").textContent = card.description ?? "";
    $("card-personality").textContent = card.personality ?? "";
    $("card-scenario").textContent = card.scenario ?? "";
    $("card-first-mes").textContent = card.first_mes ?? "";
    $("card-greetings").replaceChildren(
      ...(card.alternate_greetings ?? []).map((greeting) => {
        const item = document.createElement("li");
        item.textContent = greeting;
        return item;
      }),
    );
    $("card-lorebook").replaceChildren(
      ...(card.character_book?.entries ?? []).map((entry) => {
        const item = document.createElement("li");
        const keys = document.createElement("span");
        keys.className = "keys";
        keys.textContent = (entry.keys ?? []).join(", ");
        const content = document.createElement("span");
        content.className = "content";
        content.textContent = entry.content ?? "";
        item.append(keys, content);
        return item;
      }),
    );
    $("card-result").hidden = false;
  }

  async download(format, button) {
    $("download-error").textContent = "";
    button.disabled = true;
    try {
      const file = await this.api.download(`/jobs/${this.jobId}/download/${format}`, `${this.jobId}.${EXTENSION[format]}`);
      saveBlob(file.blob, file.filename);
    } catch (error) {
      $("download-error").textContent = `Could not download the ${format}: ${error.message}`;
    } finally {
      button.disabled = false;
    }
  }
}
