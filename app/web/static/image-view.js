// An `image` job's page: its images once it has succeeded, as thumbnails with download links.
// Both use the signed `url` that GET /jobs/{id}/artifacts gives each artifact: an <img> and a
// plain link cannot send the API key, and the signed URL needs none. A signed URL expires
// (CONVEYOR_ARTIFACT_URL_TTL), so the list is fetched when the page shows the job and again
// shortly before its URLs run out, never kept from an earlier visit.

export const IMAGE_KIND = "image";
const $ = (id) => document.getElementById(id);
// Fetch fresh URLs this long before the current ones expire (or at the half-life of a short
// TTL), so that a download link clicked at any moment still works.
const REFRESH_MARGIN_MS = 30_000;
const MIN_REFRESH_MS = 5_000;
const RETRY_MS = 10_000;

function describeSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

export class ImageView {
  constructor(api) {
    this.api = api;
    this.jobId = null;
    this.items = new Map(); // artifact id -> its elements and URL's expiry
    this.loading = null; // the job id whose list is being fetched
    this.refreshTimer = null;
  }

  /** Shows the section for an image job, empty; hides it for any other kind. */
  reset(job) {
    this.leave();
    this.jobId = job.id;
    $("image-view").hidden = job.kind !== IMAGE_KIND;
  }

  /** The page no longer shows this job: stop refreshing its URLs. */
  leave() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    this.jobId = null;
    this.loading = null;
    this.items.clear();
    $("image-list").replaceChildren();
    $("images-error").textContent = "";
    $("image-view").hidden = true;
  }

  get active() {
    return !$("image-view").hidden;
  }

  /** Once the job has succeeded (its images exist only then): list them and show each. */
  async showResult(job) {
    if (!this.active || job.id !== this.jobId || job.status !== "succeeded") return;
    if (this.items.size || this.loading === job.id) return;
    await this.load(job.id);
  }

  /** Lists the job's artifacts and shows them; on failure says so and tries again later. */
  async load(jobId) {
    this.loading = jobId;
    clearTimeout(this.refreshTimer);
    try {
      const list = await this.api.get(`/jobs/${jobId}/artifacts`);
      if (this.jobId !== jobId) return;
      $("images-error").textContent = "";
      for (const artifact of list.items) this.show(artifact);
      this.scheduleRefresh(list.items);
    } catch (error) {
      if (this.jobId !== jobId) return;
      $("images-error").textContent = `Could not list the images: ${error.message}`;
      this.refreshTimer = setTimeout(() => this.reload(jobId), RETRY_MS);
    } finally {
      if (this.loading === jobId) this.loading = null;
    }
  }

  reload(jobId) {
    if (this.jobId === jobId && this.loading !== jobId) this.load(jobId);
  }

  show(artifact) {
    const shown = this.items.get(artifact.id);
    if (shown) {
      // A refreshed URL: the links take it; an image already decoded keeps its pixels rather
      // than download them again, one that did not load tries the new URL.
      shown.expiresAt = Date.parse(artifact.url_expires_at);
      shown.link.href = artifact.url;
      shown.thumbnailLink.href = artifact.url;
      if (!(shown.img.complete && shown.img.naturalWidth > 0)) shown.img.src = artifact.url;
      return;
    }
    const item = document.createElement("li");
    item.dataset.artifactId = artifact.id;
    const thumbnailLink = document.createElement("a");
    thumbnailLink.href = artifact.url;
    thumbnailLink.target = "_blank";
    thumbnailLink.rel = "noopener";
    const img = document.createElement("img");
    img.alt = artifact.name;
    img.decoding = "async";
    img.addEventListener("error", () => this.onImageError(artifact.job_id, artifact.id));
    img.addEventListener("load", () => {
      const shown = this.items.get(artifact.id);
      if (shown) shown.renewed = false;
    });
    img.src = artifact.url;
    thumbnailLink.append(img);
    const link = document.createElement("a");
    link.className = "download";
    link.href = artifact.url;
    link.download = artifact.name;
    link.textContent = `Download ${artifact.name}`;
    const facts = document.createElement("span");
    facts.className = "hint";
    const { width, height } = artifact;
    const pixels = width && height ? `${width}×${height} · ` : "";
    facts.textContent = `${pixels}${describeSize(artifact.size)}`;
    item.append(thumbnailLink, link, facts);
    $("image-list").append(item);
    const expiresAt = Date.parse(artifact.url_expires_at);
    const name = artifact.name;
    this.items.set(artifact.id, { img, link, thumbnailLink, expiresAt, name, renewed: false });
  }

  onImageError(jobId, artifactId) {
    // An expired URL (a tab left in the background throttles the refresh timer): one fresh
    // list. Any other failure, or a fresh URL failing too (a clock far off the server's), is
    // said rather than retried in a loop.
    const shown = this.items.get(artifactId);
    if (this.jobId !== jobId || !shown) return;
    if (shown.expiresAt <= Date.now() && !shown.renewed) {
      shown.renewed = true;
      this.reload(jobId);
    } else $("images-error").textContent = `Could not load ${shown.name}.`;
  }

  scheduleRefresh(artifacts) {
    clearTimeout(this.refreshTimer);
    if (!artifacts.length) return;
    const expires = Math.min(...artifacts.map((artifact) => Date.parse(artifact.url_expires_at)));
    const remaining = expires - Date.now();
    const wait = Math.max(MIN_REFRESH_MS, Math.min(remaining - REFRESH_MARGIN_MS, remaining / 2));
    const jobId = this.jobId;
    this.refreshTimer = setTimeout(() => this.reload(jobId), wait);
  }
}
