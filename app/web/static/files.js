// Saving a file the API sends: its routes need the bearer key, which a plain link cannot send,
// so the page fetches the file and hands the browser a blob URL to save.

/** The filename a Content-Disposition header names: the UTF-8 `filename*` first (RFC 8187). */
export function dispositionFilename(header, fallback) {
  if (!header) return fallback;
  const extended = header.match(/filename\*\s*=\s*UTF-8''([^;]+)/i);
  if (extended) {
    try {
      return decodeURIComponent(extended[1].trim());
    } catch {
      // a malformed escape: the plain name below will do
    }
  }
  const plain = header.match(/filename\s*=\s*"([^"]*)"/i) || header.match(/filename\s*=\s*([^;]+)/i);
  return plain ? plain[1].trim() : fallback;
}

export function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  // Revoked later, not at once: the browser may not have started reading it yet.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
