// Live job events: one Socket.IO connection (WebSocket only), resumable by seq, with a REST
// long-polling fallback when WebSockets are unavailable. See docs/events.md.

import { EPHEMERAL_EVENTS } from "./events.js";

/**
 * Applies each event once, in seq order, whatever order and however often it arrives. An event
 * follows the last applied one when its seq is the next, or when it was replayed from
 * PostgreSQL (which has no token deltas) and names the last applied seq as its `prev`.
 */
export class Feed {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.lastSeq = 0;
    this.early = new Map();
    this.stallTimer = null;
  }

  accept(event) {
    if (event.seq <= this.lastSeq || this.early.has(event.seq)) return; // a duplicate
    this.early.set(event.seq, event);
    let next;
    while ((next = this.next()) !== undefined) this.apply(next);
    clearTimeout(this.stallTimer);
    if (this.early.size) {
      // Something is missing. A resubscribe replays it; if the stream itself lost it (Redis
      // lost its data), it will never come: go on with what we have after a few seconds.
      this.stallTimer = setTimeout(() => this.skipHole(), GAP_TIMEOUT_MS);
    }
  }

  next() {
    const following = this.early.get(this.lastSeq + 1);
    if (following) return following;
    for (const event of this.early.values()) if (event.prev === this.lastSeq) return event;
    return undefined;
  }

  apply(event) {
    this.early.delete(event.seq);
    this.lastSeq = event.seq;
    this.onEvent(event);
  }

  skipHole() {
    if (!this.early.size) return;
    this.apply(this.early.get(Math.min(...this.early.keys())));
    let next;
    while ((next = this.next()) !== undefined) this.apply(next);
  }
}

const GAP_TIMEOUT_MS = 3000;
// What a canvas's room says about its canvas jobs (docs/canvas.md): live notices, not replayed.
const CANVAS_EVENTS = [
  "ai_generation_started",
  "objects_added",
  "ai_generation_completed",
  "ai_job_error",
];
const POLL_WAIT_SECONDS = 20;
const LIST_POLL_MS = 3000;
const LIST_POLL_MAX_MS = 30000;
// A list row needs only the deltas still to come: the largest seq there can be (seqs are
// PostgreSQL integers) replays nothing.
const LIVE_ONLY = 2 ** 31 - 1;

/**
 * Runs `task` every `interval` ms until stopped. `task` reports its own errors and resolves to
 * whether it succeeded; after a failure the wait doubles, up to `maxInterval`, so that every open
 * tab does not hammer an API that is already struggling. Jitter keeps the tabs out of step.
 */
export class Repeater {
  constructor(task, { interval, maxInterval }) {
    this.task = task;
    this.interval = interval;
    this.maxInterval = maxInterval;
    this.delay = interval;
    this.running = false;
    this.timer = null;
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.delay = this.interval;
    this.schedule();
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
  }

  schedule() {
    this.timer = setTimeout(() => this.tick(), this.delay * (0.75 + Math.random() * 0.5));
  }

  async tick() {
    let succeeded = false;
    try {
      succeeded = await this.task();
    } finally {
      if (this.running) {
        this.delay = succeeded ? this.interval : Math.min(this.maxInterval, this.delay * 2);
        this.schedule();
      }
    }
  }
}

/**
 * The connection, the one job page that follows a job through it, and the job list's rows.
 * states: live | reconnecting | polling | offline
 *
 * The owner's room carries every state change but no token deltas, so the list also subscribes
 * to the rooms of the unfinished jobs it shows: their deltas carry progress, while a worker
 * writes progress (and its `job.progress` event) only every few seconds. Without a WebSocket
 * the list is reloaded from the API on an interval instead.
 */
export class Live {
  constructor(api, { onState, onOwnerEvent, onRowProgress, refreshList }) {
    this.api = api;
    this.onState = onState;
    this.onOwnerEvent = onOwnerEvent;
    this.onRowProgress = onRowProgress;
    this.refreshList = refreshList;
    this.watch = null; // { jobId, feed }
    this.canvas = null; // { canvasId, onSubscribed, onEvent }: the canvas room the page follows
    this.rows = new Set(); // ids of the list's unfinished jobs, whose deltas it wants
    this.failures = 0;
    this.polling = false;
    this.everConnected = false;
    this.socket = null;
    this.listPoller = new Repeater(() => this.pollList(), {
      interval: LIST_POLL_MS,
      maxInterval: LIST_POLL_MAX_MS,
    });
  }

  start() {
    if (typeof io !== "function") {
      this.startPolling(); // the client library is missing: REST only
      return;
    }
    this.socket = io(window.location.origin, {
      transports: ["websocket"],
      // Called at every (re)connect: a fresh short-lived token, never the API key itself.
      auth: (send) => this.api.token().then((token) => send({ token })).catch(() => send({})),
      reconnection: true,
      reconnectionDelay: 500, // exponential backoff with jitter, from 0.5 s up to 10 s
      reconnectionDelayMax: 10000,
      randomizationFactor: 0.5,
    });
    this.socket.on("connect", () => {
      // The owner's room said nothing to this page while it was away: reload the list once.
      const missedEvents = this.everConnected || this.polling;
      this.everConnected = true;
      this.failures = 0;
      this.stopPolling();
      this.setState("live");
      this.resubscribe();
      this.subscribeCanvas();
      this.subscribeRows(this.rows);
      if (missedEvents) this.refreshList();
    });
    this.socket.on("disconnect", () => this.setState("reconnecting"));
    this.socket.on("connect_error", () => {
      this.failures += 1;
      // After a few failed attempts keep the page alive over plain HTTP; the socket keeps
      // trying in the background and takes over again when it connects.
      if (this.failures >= 3) this.startPolling();
      else this.setState("reconnecting");
    });
    this.socket.on("job_event", (event) => {
      if (this.watch && event.job_id === this.watch.jobId) this.watch.feed.accept(event);
      if (!EPHEMERAL_EVENTS.has(event.type)) this.onOwnerEvent(event);
      else if (this.rows.has(event.job_id)) this.onRowProgress(event.job_id, event.data.progress);
    });
    for (const name of CANVAS_EVENTS) {
      this.socket.on(name, (data) => {
        const canvas = this.canvas;
        if (canvas && data?.canvas_id === canvas.canvasId) canvas.onEvent(name, data);
      });
    }
    this.socket.io.on("reconnect_attempt", () => {
      if (!this.polling) this.setState("reconnecting");
    });
  }

  setState(state) {
    this.onState(state);
  }

  follow(jobId, onEvent) {
    this.unfollow();
    this.watch = { jobId, feed: new Feed(onEvent) };
    this.resubscribe();
    if (this.polling) this.pollJob(this.watch);
  }

  unfollow() {
    if (this.watch && this.socket?.connected && !this.rows.has(this.watch.jobId)) {
      this.socket.emit("unsubscribe", { job_id: this.watch.jobId });
    }
    this.watch = null;
  }

  resubscribe() {
    const watch = this.watch;
    if (!watch || !this.socket?.connected) return;
    this.socket.emit("subscribe", { job_id: watch.jobId, after_seq: watch.feed.lastSeq }, (ack) => {
      if (!ack?.ok) console.warn("subscribe refused", ack);
    });
  }

  /**
   * Joins a canvas's room, now and at every reconnect. Its notices are not replayed, so
   * `onSubscribed` runs after each join: the moment to read the canvas, missing nothing that
   * the room says after it. Without a WebSocket there is no room; the job's own events are
   * the only news.
   */
  followCanvas(canvasId, { onSubscribed, onEvent }) {
    this.unfollowCanvas();
    this.canvas = { canvasId, onSubscribed, onEvent };
    this.subscribeCanvas();
  }

  unfollowCanvas() {
    if (this.canvas && this.socket?.connected) {
      this.socket.emit("unsubscribe", { canvas_id: this.canvas.canvasId });
    }
    this.canvas = null;
  }

  subscribeCanvas() {
    const canvas = this.canvas;
    if (!canvas || !this.socket?.connected) return;
    this.socket.emit("subscribe", { canvas_id: canvas.canvasId }, (ack) => {
      if (this.canvas !== canvas) return;
      if (ack?.ok) canvas.onSubscribed(ack);
      else console.warn("canvas subscribe refused", ack);
    });
  }

  /** The list shows these jobs unfinished: follow their deltas (only while live). */
  watchRows(jobIds) {
    const wanted = new Set(jobIds);
    const connected = this.socket?.connected;
    for (const jobId of this.rows) {
      if (!wanted.has(jobId) && connected && jobId !== this.watch?.jobId) {
        this.socket.emit("unsubscribe", { job_id: jobId });
      }
    }
    const added = [...wanted].filter((jobId) => !this.rows.has(jobId));
    this.rows = wanted;
    if (connected) this.subscribeRows(added);
  }

  subscribeRows(jobIds) {
    for (const jobId of jobIds) {
      this.socket.emit("subscribe", { job_id: jobId, after_seq: LIVE_ONLY });
    }
  }

  startPolling() {
    if (this.polling) return;
    this.polling = true;
    this.setState("polling");
    this.listPoller.start();
    if (this.watch) this.pollJob(this.watch);
  }

  stopPolling() {
    // pollJob's loop ends by itself at its next turn.
    this.polling = false;
    this.listPoller.stop();
  }

  async pollList() {
    const succeeded = await this.refreshList();
    if (this.polling) this.setState(succeeded ? "polling" : "offline");
    return succeeded;
  }

  async pollJob(watch) {
    // Long-polls the events API from the feed's last seq until the socket is back, the page
    // follows another job, or the job has ended.
    while (this.polling && this.watch === watch) {
      try {
        const page = await this.api.get(
          `/jobs/${watch.jobId}/events?after=${watch.feed.lastSeq}&wait=${POLL_WAIT_SECONDS}`,
        );
        page.items.forEach((event) => watch.feed.accept(event));
        const ended = ["succeeded", "failed", "canceled"].includes(page.status);
        if (ended && watch.feed.lastSeq >= page.last_seq) return;
      } catch (error) {
        this.setState("offline");
        await new Promise((resolve) => setTimeout(resolve, 2000 + Math.random() * 1000));
        if (this.polling) this.setState("polling");
      }
    }
  }
}
