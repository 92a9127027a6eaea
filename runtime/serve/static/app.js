// The page's client for /v1/stream (protocol: runtime/serve/websocket.py).
// Audio chunks are scheduled back to back on one AudioContext as they arrive;
// words light up when the playback clock reaches their start time.
"use strict";

const $ = (id) => document.getElementById(id);
// What happened, for people (the status line) and for the headless-browser test.
const stats = (window.dia2Stats = {
  bytes: 0, chunks: 0, playedChunks: 0, playedSeconds: 0, words: 0, spoken: 0, done: false, error: null,
});

async function loadVoices() {
  const response = await fetch("/v1/voices");
  const { voices } = await response.json();
  for (const select of [$("voice1"), $("voice2")]) {
    select.replaceChildren(...voices.map((v) => new Option(v.name, v.name, false, v.name === "default")));
  }
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// The script goes out word by word, as an LLM would produce it: the server starts
// speaking before the last word arrives.
function pieces(script) {
  return script.match(/\s*\S+/g) || [];
}

function startMessage() {
  const message = { type: "start", voice: $("voice1").value, voice_2: $("voice2").value,
                    seed: Number($("seed").value || 0) };
  if ($("temperature").value !== "") message.temperature = Number($("temperature").value);
  return message;
}

class Player {
  constructor() {
    this.ctx = new AudioContext();
    this.rate = 24000;
    this.next = 0;  // context time at which the next chunk starts
    this.origin = null;  // context time of the first sample
    this.words = [];  // {start, el}
    this.ticking = false;
  }

  play(buffer) {
    const samples = new Int16Array(buffer);
    const audio = this.ctx.createBuffer(1, samples.length, this.rate);
    const channel = audio.getChannelData(0);
    for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
    const source = this.ctx.createBufferSource();
    source.buffer = audio;
    source.connect(this.ctx.destination);
    // A little headroom so the first chunks do not underrun while the next ones are generated.
    const at = Math.max(this.next, this.ctx.currentTime + 0.1);
    if (this.origin === null) this.origin = at;
    source.onended = () => { stats.playedChunks += 1; stats.playedSeconds += audio.duration; };
    source.start(at);
    this.next = at + audio.duration;
    this.tick();
  }

  addWords(words) {
    for (const { word, start } of words) {
      const el = document.createElement("span");
      el.textContent = word + " ";
      $("words").append(el);
      this.words.push({ start, el });
      stats.words += 1;
    }
    this.tick();
  }

  tick() {
    if (this.ticking) return;
    this.ticking = true;
    const step = () => {
      const now = this.origin === null ? -1 : this.ctx.currentTime - this.origin;
      let current = null;
      for (const w of this.words) {
        if (w.start <= now) {
          if (!w.el.classList.contains("spoken")) { w.el.classList.add("spoken"); stats.spoken += 1; }
          current = w;
        }
        w.el.classList.remove("current");
      }
      if (current) current.el.classList.add("current");
      const playing = this.origin !== null && this.ctx.currentTime < this.next;
      if (playing || !stats.done) requestAnimationFrame(step);
      else { this.ticking = false; if (current) current.el.classList.remove("current"); }
    };
    requestAnimationFrame(step);
  }
}

function speak() {
  const script = $("script").value;
  $("words").replaceChildren();
  Object.assign(stats, { bytes: 0, chunks: 0, playedChunks: 0, playedSeconds: 0, words: 0, spoken: 0,
                         done: false, error: null });
  for (const id of ["ttfa", "rtf", "audio"]) $(id).textContent = "–";
  const player = new Player();  // made on the click: browsers only start audio after a gesture
  const clicked = performance.now();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/stream`);
  ws.binaryType = "arraybuffer";
  $("play").disabled = true;
  setStatus("Connecting…");

  ws.onopen = () => {
    ws.send(JSON.stringify(startMessage()));
    for (const text of pieces(script)) ws.send(JSON.stringify({ type: "text", text }));
    ws.send(JSON.stringify({ type: "end" }));
  };
  ws.onmessage = (event) => {
    if (typeof event.data !== "string") {
      if (stats.chunks === 0) $("ttfa").textContent = `${((performance.now() - clicked) / 1000).toFixed(2)} s`;
      stats.bytes += event.data.byteLength;
      stats.chunks += 1;
      player.play(event.data);
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "ready") { player.rate = message.sample_rate; setStatus("Speaking…"); }
    else if (message.type === "words") player.addWords(message.words);
    else if (message.type === "done") finish(message);
    else if (message.type === "error") { stats.error = message.message; setStatus(message.message, true); }
  };
  ws.onclose = (event) => {
    $("play").disabled = false;
    if (!stats.done && !stats.error) {
      stats.error = event.reason || `connection closed (${event.code})`;
      setStatus(stats.error, true);
    }
  };

  function finish(summary) {
    stats.done = true;
    stats.summary = summary;
    $("rtf").textContent = summary.rtf === null ? "–" : summary.rtf.toFixed(3);
    $("audio").textContent = `${summary.audio_seconds.toFixed(2)} s`;
    const server = summary.ttfa === null ? "" : ` (server ${(summary.ttfa * 1000).toFixed(0)} ms)`;
    $("ttfa").textContent += server;
    setStatus(`Done: ${summary.audio_seconds.toFixed(2)} s of audio in ${summary.wall_seconds.toFixed(2)} s.`);
  }
}

$("play").addEventListener("click", speak);
loadVoices().catch((error) => setStatus(`cannot list voices: ${error}`, true));
