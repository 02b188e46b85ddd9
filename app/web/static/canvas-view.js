// A `canvas` job's page: the canvas it draws on, as SVG. The canvas is read with
// GET /canvases/{id} when the page opens the job, each time it (re)joins the canvas's room, and
// when the job ends; between those, the room's `objects_added` draws objects as they are saved
// (docs/canvas.md). Objects are never removed one by one, so what each source says is merged by
// id. Every text (the canvas's name, an object's label) is model or user input: it is only
// ever set as textContent, and every attribute through setAttribute.

export const CANVAS_KIND = "canvas";
const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
const XHTML_NS = "http://www.w3.org/1999/xhtml";
const INK = "#1f2937";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

const objects = (count) => `${count} object${count === 1 ? "" : "s"}`;

function svg(name, attributes = {}) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [attribute, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) element.setAttribute(attribute, String(value));
  }
  return element;
}

/** Bottom to top, as the API orders them: by z, then id. */
function stacking(a, b) {
  if (a.z !== b.z) return a.z - b.z;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

/** A label wrapped inside a box: HTML in a foreignObject, which SVG's <text> cannot do. */
function boxLabel(object, className, color) {
  const frame = svg("foreignObject", {
    x: object.x,
    y: object.y,
    width: object.width,
    height: object.height,
  });
  const label = document.createElementNS(XHTML_NS, "div");
  label.className = className;
  label.style.color = color;
  label.textContent = object.text;
  frame.append(label);
  return frame;
}

function drawBox(object) {
  const { x, y, width, height } = object;
  const paint = { fill: object.fill ?? "none", ...outline(object) };
  const parts = [];
  if (object.type === "ellipse") {
    const [rx, ry] = [width / 2, height / 2];
    parts.push(svg("ellipse", { cx: x + rx, cy: y + ry, rx, ry, ...paint }));
  } else {
    const rx = object.type === "sticky_note" ? 4 : 0;
    parts.push(svg("rect", { x, y, width, height, rx, ...paint }));
  }
  if (object.text) {
    const className = object.type === "sticky_note" ? "canvas-label note" : "canvas-label";
    parts.push(boxLabel(object, className, INK));
  }
  return parts;
}

function drawText(object) {
  // A text object's `fill` colours its letters, as SVG's fill does for text; a `stroke`
  // outlines its frame.
  const parts = [];
  if (object.stroke) {
    parts.push(svg("rect", { ...frameOf(object), fill: "none", ...outline(object) }));
  }
  parts.push(boxLabel(object, "canvas-label text", object.fill ?? INK));
  return parts;
}

function frameOf(object) {
  return { x: object.x, y: object.y, width: object.width, height: object.height };
}

function outline(object) {
  return { stroke: object.stroke ?? "none", "stroke-width": object.stroke_width };
}

function drawSegment(object) {
  const x2 = object.x + object.width;
  const y2 = object.y + object.height;
  const stroke = object.stroke ?? "none";
  const parts = [
    svg("line", {
      x1: object.x,
      y1: object.y,
      x2,
      y2,
      stroke,
      "stroke-width": object.stroke_width,
      "stroke-linecap": "round",
    }),
  ];
  if (object.type === "arrow") {
    // The head at the end, pointing along the line, sized by the stroke.
    const angle = Math.atan2(object.height, object.width);
    const length = Math.max(10, object.stroke_width * 4);
    const spread = Math.PI / 7;
    const corner = (side) => {
      const direction = angle + side * spread;
      return `${x2 - length * Math.cos(direction)},${y2 - length * Math.sin(direction)}`;
    };
    parts.push(svg("polygon", { points: `${x2},${y2} ${corner(1)} ${corner(-1)}`, fill: stroke }));
  }
  if (object.text) {
    const label = svg("text", {
      x: object.x + object.width / 2,
      y: object.y + object.height / 2 - 6,
      "text-anchor": "middle",
      class: "canvas-line-label",
    });
    label.textContent = object.text;
    parts.push(label);
  }
  return parts;
}

export class CanvasView {
  constructor(api, live) {
    this.api = api;
    this.live = live;
    this.jobId = null;
    this.canvasId = null;
    this.canvas = null; // the last GET's canvas (name, size)
    this.drawn = new Map(); // object id -> its <g>
    this.imageUrls = new Map(); // artifact id -> Promise of a blob URL
  }

  /** Shows the section for a canvas job and starts following its canvas; hides it otherwise. */
  reset(job) {
    this.leave();
    this.jobId = job.id;
    const canvasId = job.kind === CANVAS_KIND ? job.input?.canvas_id : null;
    if (!canvasId) return;
    this.canvasId = canvasId;
    $("canvas-view").hidden = false;
    this.live.followCanvas(canvasId, {
      onSubscribed: () => {
        $("canvas-view").dataset.subscribed = "true";
        this.load(canvasId);
      },
      onEvent: (name, data) => this.onRoomEvent(name, data),
    });
    this.load(canvasId);
  }

  leave() {
    if (this.canvasId) this.live.unfollowCanvas();
    this.jobId = null;
    this.canvasId = null;
    this.canvas = null;
    this.drawn.clear();
    for (const url of this.imageUrls.values()) {
      url.then((href) => href && URL.revokeObjectURL(href)); // one still on its way, too
    }
    this.imageUrls.clear();
    $("canvas-objects").replaceChildren();
    for (const id of ["canvas-name", "canvas-facts", "canvas-notice", "canvas-error"]) {
      $(id).textContent = "";
    }
    delete $("canvas-view").dataset.subscribed;
    $("canvas-view").hidden = true;
  }

  /** A state change of the job: once it has ended, the canvas as the API has it now. */
  showResult(job) {
    if (!this.canvasId || job.id !== this.jobId || !TERMINAL.has(job.status)) return;
    this.load(this.canvasId);
  }

  async load(canvasId) {
    let canvas;
    try {
      canvas = await this.api.get(`/canvases/${canvasId}`);
    } catch (error) {
      if (this.canvasId !== canvasId) return;
      if (error.status === 404) {
        // Deleted (its objects with it), or never this key's.
        this.drawn.clear();
        $("canvas-objects").replaceChildren();
        $("canvas-error").textContent = "This canvas no longer exists.";
      } else $("canvas-error").textContent = `Could not load the canvas: ${error.message}`;
      return;
    }
    if (this.canvasId !== canvasId) return;
    $("canvas-error").textContent = "";
    this.canvas = canvas;
    $("canvas-name").textContent = canvas.name;
    $("canvas-svg").setAttribute("viewBox", `0 0 ${canvas.width} ${canvas.height}`);
    $("canvas-paper").setAttribute("width", canvas.width);
    $("canvas-paper").setAttribute("height", canvas.height);
    for (const object of canvas.objects) this.draw(object);
    this.showFacts();
  }

  showFacts() {
    if (!this.canvas) return;
    const { width, height } = this.canvas;
    $("canvas-facts").textContent = `${width} × ${height} px · ${objects(this.drawn.size)}`;
  }

  onRoomEvent(name, data) {
    const who = data.job_id === this.jobId ? "" : `Job ${data.job_id.slice(0, 8)}: `;
    if (name === "objects_added") {
      for (const object of data.objects) this.draw(object);
      this.showFacts();
    } else if (name === "ai_generation_started") {
      const upTo = objects(data.max_objects);
      $("canvas-notice").textContent = `${who}generating up to ${upTo} (attempt ${data.attempt})…`;
    } else if (name === "ai_generation_completed") {
      const saved = data.object_ids.length;
      const fewer = saved < data.generated ? ` of ${data.generated} generated` : "";
      $("canvas-notice").textContent = `${who}saved ${objects(saved)}${fewer}.`;
    } else if (name === "ai_job_error") {
      const why = data.message ? `${data.code}: ${data.message}` : data.code;
      $("canvas-notice").textContent = `${who}${data.status}, nothing saved (${why}).`;
    }
  }

  draw(object) {
    if (this.drawn.has(object.id)) return;
    const group = svg("g", {
      class: "canvas-object",
      "data-object-id": object.id,
      "data-type": object.type,
      "data-z": object.z,
      "data-job-id": object.job_id,
    });
    if (object.rotation) {
      const cx = object.x + object.width / 2;
      const cy = object.y + object.height / 2;
      group.setAttribute("transform", `rotate(${object.rotation} ${cx} ${cy})`);
    }
    group.append(...this.parts(object, group));
    const above = [...$("canvas-objects").children].find(
      (drawn) => stacking(object, { z: Number(drawn.dataset.z), id: drawn.dataset.objectId }) < 0,
    );
    $("canvas-objects").insertBefore(group, above ?? null);
    this.drawn.set(object.id, group);
  }

  parts(object, group) {
    if (object.type === "line" || object.type === "arrow") return drawSegment(object);
    if (object.type === "text") return drawText(object);
    if (object.type === "image") return this.drawImage(object, group);
    return drawBox(object);
  }

  drawImage(object, group) {
    const parts = [];
    if (object.artifact_id) {
      const image = svg("image", { ...frameOf(object), preserveAspectRatio: "xMidYMid meet" });
      parts.push(image);
      group.dataset.state = "loading";
      this.imageUrl(object.artifact_id).then((href) => {
        if (!href) {
          group.dataset.state = "error";
          return;
        }
        image.setAttribute("href", href);
        group.dataset.state = "loaded";
      });
    } else {
      // Its artifact was deleted with the job that made it: the frame stays, empty.
      group.dataset.state = "missing";
      const empty = { fill: "#f2f4f7", stroke: "#98a2b3", "stroke-dasharray": "6 4" };
      parts.push(svg("rect", { ...frameOf(object), ...empty }));
    }
    if (object.stroke) {
      parts.push(svg("rect", { ...frameOf(object), fill: "none", ...outline(object) }));
    }
    return parts;
  }

  /**
   * The artifact's bytes as a blob URL, fetched once with the key. An object names only its
   * artifact, whose signed URL would need its image job's id; and a blob URL never expires.
   */
  imageUrl(artifactId) {
    if (!this.imageUrls.has(artifactId)) {
      const canvasId = this.canvasId;
      const url = this.api
        .download(`/artifacts/${artifactId}`, artifactId)
        .then((file) => URL.createObjectURL(file.blob))
        .catch((error) => {
          if (this.canvasId === canvasId) {
            $("canvas-error").textContent = `Could not load an image: ${error.message}`;
          }
          return null;
        });
      this.imageUrls.set(artifactId, url);
    }
    return this.imageUrls.get(artifactId);
  }
}
