// A form generated from a kind's input JSON Schema (what GET /api/v1/kinds returns).

function plain(schema) {
  // Optional fields are `anyOf: [X, {type: "null"}]`: the form shows X.
  if (schema.anyOf) {
    const real = schema.anyOf.filter((s) => s.type !== "null");
    if (real.length === 1) return { ...schema, ...real[0], anyOf: undefined };
  }
  return schema;
}

function title(name, schema) {
  return schema.title || name.replace(/_/g, " ");
}

function control(name, schema) {
  const s = plain(schema);
  let input;
  if (s.enum) {
    input = document.createElement("select");
    for (const value of ["", ...s.enum]) input.add(new Option(value || "—", value));
  } else if (s.type === "boolean") {
    input = document.createElement("input");
    input.type = "checkbox";
  } else if (s.type === "integer" || s.type === "number") {
    input = document.createElement("input");
    input.type = "number";
    input.step = s.type === "integer" ? "1" : "any";
    if (s.minimum !== undefined) input.min = s.minimum;
    if (s.maximum !== undefined) input.max = s.maximum;
  } else if (s.type === "string" && !(s.maxLength > 0 && s.maxLength <= 200)) {
    input = document.createElement("textarea");
  } else if (s.type === "string") {
    input = document.createElement("input");
    input.type = "text";
  } else {
    input = document.createElement("textarea"); // objects and arrays: JSON
    input.placeholder = s.type === "array" ? "[ … ] (JSON)" : "{ … } (JSON)";
    input.dataset.json = "true";
  }
  if (s.default !== undefined && s.default !== null && input.type !== "checkbox") {
    input.value = typeof s.default === "object" ? JSON.stringify(s.default) : s.default;
  }
  input.name = name;
  input.dataset.type = s.type || "json";
  return input;
}

/** Renders the fields into `container`; returns a function that reads them back. */
export function renderForm(container, schema) {
  container.replaceChildren();
  const required = new Set(schema.required || []);
  const inputs = [];
  for (const [name, property] of Object.entries(schema.properties || {})) {
    const label = document.createElement("label");
    label.append(title(name, property) + (required.has(name) ? " *" : ""));
    const input = control(name, property);
    label.append(input);
    if (property.description) {
      const hint = document.createElement("span");
      hint.className = "hint";
      hint.textContent = " " + property.description;
      label.append(hint);
    }
    const error = document.createElement("span");
    error.className = "field-error";
    error.dataset.field = `input.${name}`;
    label.append(error);
    container.append(label);
    inputs.push(input);
  }
  return () => {
    const value = {};
    for (const input of inputs) {
      if (input.type === "checkbox") {
        if (input.checked) value[input.name] = true;
        continue;
      }
      if (input.value.trim() === "") continue; // left empty: the server's default
      if (input.dataset.json) {
        try {
          value[input.name] = JSON.parse(input.value);
        } catch {
          throw new FieldError(`input.${input.name}`, "is not valid JSON");
        }
      } else if (input.dataset.type === "integer" || input.dataset.type === "number") {
        value[input.name] = Number(input.value);
      } else {
        value[input.name] = input.value;
      }
    }
    return value;
  };
}

export class FieldError extends Error {
  constructor(field, message) {
    super(`${field}: ${message}`);
    this.field = field;
    this.detail = message;
  }
}

/** Shows problem+json field errors next to their fields; returns those it could not place. */
export function showFieldErrors(form, errors) {
  form.querySelectorAll(".field-error").forEach((el) => (el.textContent = ""));
  const unplaced = [];
  for (const error of errors) {
    const slot = form.querySelector(`.field-error[data-field="${CSS.escape(error.field)}"]`);
    if (slot) slot.textContent = " " + error.message;
    else unplaced.push(error);
  }
  return unplaced;
}
