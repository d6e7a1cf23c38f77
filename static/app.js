// The page over serve.py's API: pick a run, generate (each character shaded by the model's
// surprise, its candidates on hover), score a text, or compare two runs on one prompt.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_SHADE_BITS = 8; // a character this surprising or more gets the darkest shade
let runs = [];
let mode = "generate";
let running = null; // the AbortController of the generation(s) streaming now
const shown = { a: [], b: [] }; // per pane: what the tooltip shows for each character

// ---- runs and checkpoints ------------------------------------------------------------

async function loadRuns() {
  const answer = await getJSON("/api/runs");
  runs = answer.runs;
  for (const suffix of ["", "-b"]) {
    const select = $("run" + suffix);
    select.replaceChildren(...runs.map((run) => new Option(runLabel(run), run.id)));
    select.value = answer.default;
    select.addEventListener("change", () => showRun(suffix));
    showRun(suffix);
    const checkpoint = $("checkpoint" + suffix);
    if ([...checkpoint.options].some((option) => option.value === answer.default_checkpoint)) {
      checkpoint.value = answer.default_checkpoint; // the one serve.py was started on
    }
  }
}

function runLabel(run) {
  const loss = run.full_split_val_loss == null ? "no loss yet" : run.full_split_val_loss.toFixed(4);
  return `${run.id} · ${loss}`;
}

function showRun(suffix) {
  const run = runs.find((r) => r.id === $("run" + suffix).value);
  if (!run) return;
  const checkpoints = $("checkpoint" + suffix);
  checkpoints.replaceChildren(...run.checkpoints.map((name) => new Option(name, name)));
  const facts = [
    run.tag && `tag ${run.tag}`,
    run.parameters != null && `${(run.parameters / 1e6).toFixed(2)}M parameters`,
    run.full_split_val_loss != null &&
      `full-split val ${run.full_split_val_loss.toFixed(4)} (${run.full_split_val_bpc.toFixed(3)} bits/char)`,
    run.steps != null && `${run.steps} steps`,
    run.date && run.date.replace("T", " "),
  ].filter(Boolean);
  $("run-facts" + suffix).textContent = facts.join(" · ");
}

// ---- modes ---------------------------------------------------------------------------

function setMode(next) {
  if (running) running.abort(); // a generation of the mode being left ends with it
  mode = next;
  document.body.className = next;
  for (const tab of document.querySelectorAll("nav button")) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === next));
  }
  $("go").textContent = next === "score" ? "Score" : "Generate";
  $("prompt-label").textContent = next === "score" ? "Text to score" : "Prompt";
  $("legend").textContent = next === "score"
    ? "Shade: the model's surprise at each character given the ones before it (bits); point at one for what it expected."
    : "Shade: how surprised the model was by each character it drew; point at one for the ten candidates before and after the sampling settings.";
  clearOutputs();
}

function clearOutputs() {
  for (const pane of ["a", "b"]) {
    $("output-" + pane).replaceChildren();
    $("summary-" + pane).textContent = "";
    $("title-" + pane).textContent = "";
    shown[pane] = [];
  }
  showError(null);
}

// ---- generation ----------------------------------------------------------------------

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function generationBody(suffix, seed) {
  return {
    run: $("run" + suffix).value,
    checkpoint: $("checkpoint" + suffix).value,
    prompt: $("prompt").value,
    max_new_tokens: numberOrNull("max_new_tokens"),
    temperature: numberOrNull("temperature"),
    top_k: numberOrNull("top_k"),
    top_p: numberOrNull("top_p"),
    min_p: numberOrNull("min_p"),
    repetition_penalty: numberOrNull("repetition_penalty"),
    seed: seed,
    stop: $("stop").value.split("\n").filter((s) => s !== "").map(unescape),
  };
}

// a stop string typed as \n, \t or \\ means a newline, a tab or a backslash, as in a shell's $'...'
function unescape(text) {
  return text.replace(/\\([nt\\])/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
}

async function generate() {
  clearOutputs();
  $("status").textContent = "starting…"; // not the last run's "done"
  const controller = new AbortController();
  running = controller;
  setRunning(true);
  // compare: both runs draw with one seed, so the difference is the models'
  let seed = numberOrNull("seed");
  if (mode === "compare" && seed === null) seed = Math.floor(Math.random() * 2 ** 32);
  const panes = mode === "compare" ? [["a", ""], ["b", "-b"]] : [["a", ""]];
  try {
    await Promise.all(panes.map(([pane, suffix]) =>
      streamInto(pane, generationBody(suffix, seed), controller.signal)));
    $("status").textContent = "done";
  } catch (error) {
    controller.abort(); // one pane failed: the other stops too
    if (error.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      $("status").textContent = "";
      showError(error.message);
    }
  } finally {
    if (running === controller) {
      running = null;
      setRunning(false);
    }
  }
}

async function streamInto(pane, body, signal) {
  const response = await fetch("/api/generate", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new Error(await errorText(response));
  const output = $("output-" + pane);
  $("title-" + pane).textContent = `${body.run} · ${body.checkpoint}`;
  addText(output, body.prompt, "prompt");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  let ended = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines) {
      if (!line) continue;
      const event = JSON.parse(line);
      ended = ended || event.type === "end";
      onEvent(pane, event);
    }
  }
  if (!ended) throw new Error("the server closed the stream before the end of the sample");
}

function onEvent(pane, event) {
  if (event.type === "start") {
    $("status").textContent = `generating with seed ${event.seed}…`;
  } else if (event.type === "char") {
    const index = shown[pane].push({ kind: "generated", ...event }) - 1;
    addChar($("output-" + pane), event.text, -Math.log2(Math.max(event.p, 1e-12)), pane, index);
  } else if (event.type === "end") {
    const rate = event.tokens_per_second == null ? "" : `, ${event.tokens_per_second} characters/s`;
    $("summary-" + pane).textContent =
      `${event.new_tokens} characters generated${rate}, seed ${event.seed}` +
      (event.stopped ? ", ended at a stop string (not shown)" : "");
  } else if (event.type === "error") {
    throw new Error(event.error);
  }
}

function setRunning(on) {
  $("go").disabled = on;
  $("stop-button").disabled = !on;
}

// ---- scoring -------------------------------------------------------------------------

async function score() {
  clearOutputs();
  setRunning(true);
  $("status").textContent = "scoring…";
  try {
    const response = await fetch("/api/score", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ run: $("run").value, checkpoint: $("checkpoint").value,
                             text: $("prompt").value }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const answer = await response.json();
    const output = $("output-a");
    $("title-a").textContent = `${answer.run} · ${answer.checkpoint}`;
    answer.chars.forEach((char, index) => {
      shown.a.push({ kind: "scored", ...char });
      if (char.bits === null) addText(output, char.text, "prompt");
      else addChar(output, char.text, char.bits, "a", index);
    });
    $("summary-a").textContent =
      `${answer.bits_per_character.toFixed(3)} bits per character (loss ${answer.loss.toFixed(4)}) ` +
      `over ${answer.scored} characters; the first is context only`;
    $("status").textContent = "done";
  } catch (error) {
    $("status").textContent = "";
    showError(error.message);
  } finally {
    setRunning(false);
  }
}

// ---- drawing -------------------------------------------------------------------------

function addText(output, text, className) {
  for (const char of text) {
    const span = document.createElement("span");
    span.className = char === "\n" ? `${className} nl` : className;
    span.textContent = char;
    output.append(span);
  }
}

function addChar(output, char, bits, pane, index) {
  const span = document.createElement("span");
  span.className = char === "\n" ? "c nl" : "c";
  span.textContent = char;
  span.dataset.pane = pane;
  span.dataset.index = index;
  const shade = Math.min(bits, MAX_SHADE_BITS) / MAX_SHADE_BITS;
  span.style.backgroundColor = `rgba(214, 69, 65, ${(0.85 * shade).toFixed(3)})`;
  output.append(span);
}

function visible(char) {
  return { "\n": "↵", " ": "␣", "\t": "⇥" }[char] ?? char;
}

function candidateTable(title, candidates, chosen) {
  const rows = candidates.map(([char, p]) =>
    `<tr class="${char === chosen ? "chosen" : ""}"><td>${escapeHTML(visible(char))}</td>` +
    `<td>${p.toFixed(3)}</td><td class="bar"><i style="width:${(100 * p).toFixed(1)}%"></i></td></tr>`);
  return `<div><h3>${title}</h3><table>${rows.join("")}</table></div>`;
}

function tooltipHTML(info) {
  const char = escapeHTML(visible(info.text));
  if (info.kind === "scored") {
    return `<h3>'${char}': ${info.bits.toFixed(2)} bits (p ${(2 ** -info.bits).toFixed(3)})</h3>` +
      `<div class="cols">${candidateTable("the model expected", info.top, info.text)}</div>`;
  }
  return `<h3>'${char}': the model gave it p ${info.p.toFixed(3)}, drawn at ${info.p_drawn.toFixed(3)}</h3>` +
    `<div class="cols">${candidateTable("the model", info.top, info.text)}` +
    `${candidateTable("after the sampling settings", info.top_drawn, info.text)}</div>`;
}

function escapeHTML(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function onPointer(event) {
  const span = event.target.closest("span.c");
  const tooltip = $("tooltip");
  if (!span) { tooltip.hidden = true; return; }
  tooltip.innerHTML = tooltipHTML(shown[span.dataset.pane][Number(span.dataset.index)]);
  tooltip.hidden = false;
  const box = span.getBoundingClientRect();
  const left = Math.min(box.left, window.innerWidth - tooltip.offsetWidth - 8);
  const below = box.bottom + 6 + tooltip.offsetHeight < window.innerHeight;
  tooltip.style.left = `${Math.max(4, left)}px`;
  tooltip.style.top = `${below ? box.bottom + 6 : box.top - tooltip.offsetHeight - 6}px`;
}

// ---- errors --------------------------------------------------------------------------

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function errorText(response) {
  try {
    return (await response.json()).error ?? `the server answered ${response.status}`;
  } catch {
    return `the server answered ${response.status}`;
  }
}

function showError(message) {
  $("error").hidden = message === null;
  $("error").textContent = message ?? "";
}

// ---- wiring --------------------------------------------------------------------------

for (const tab of document.querySelectorAll("nav button")) {
  tab.addEventListener("click", () => setMode(tab.dataset.mode));
}
$("go").addEventListener("click", () => (mode === "score" ? score() : generate()));
$("stop-button").addEventListener("click", () => running && running.abort());
for (const pane of ["output-a", "output-b"]) {
  $(pane).addEventListener("mouseover", onPointer);
  $(pane).addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
}
setMode("generate");
loadRuns().catch((error) => showError(error.message));
