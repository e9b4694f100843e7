// snac-stream browser client: microphone -> websocket roundtrip session (docs/protocol.md) -> speaker.
//
// The AudioContext runs at the model's sample rate (read from /config.json), so the mic is resampled by the
// browser and the samples go to the server as they are. `window.snac` holds the live state (read by the tests
// and handy in the console). URL options: autostart=1, seconds=N (stop after N s of audio sent),
// format=pcm16|float32, jitter_ms=N (playback margin beyond one engine step), token=..., ws=ws://host:port,
// record=1 (keep sent and received audio: snac.sentBase64(), snac.receivedBase64()).
'use strict';

const params = new URLSearchParams(location.search);
const HEADER_BYTES = 32;
const WINDOW_MS = 5000;

const snac = {
  state: 'idle',  // idle | connecting | streaming | stopping | done | error
  error: null,    // {code, message, hint}
  config: null,   // /config.json
  ready: null,    // the server's ready message
  sentSamples: 0, sentBytes: 0, sentSumSquares: 0,
  receivedSamples: 0, receivedBytes: 0, receivedSumSquares: 0, receivedTokens: 0,
  audioFrames: 0, outOfOrder: 0, finalFrames: 0,
  underruns: 0, underrunMs: 0, bufferedMs: 0, played: 0, drained: false,
  done: null, closeCode: null,
  latency: null,  // see computeLatency()
  recorded: { sent: [], received: [] },
  sentBase64: () => toBase64(snac.recorded.sent),
  receivedBase64: () => toBase64(snac.recorded.received),
};
window.snac = snac;

const $ = (id) => document.getElementById(id);
let ctx = null, ws = null, micStream = null, micSource = null, capture = null, playback = null;
let rate = 0, t0 = Infinity, opened = false;
let chunks = [];      // {start, n, frame}: capture frame of each sent chunk's first sample
let split = [];       // {t, total, algorithmic, server, transport} per received audio frame (ms)
let e2e = [];         // {t, graph} mic-to-speaker through the page (ms)
let deviceMs = 0;

// ---- UI ---------------------------------------------------------------------------------------------------
function setState(state) {
  snac.state = state;
  $('state').textContent = state;
  const busy = state === 'connecting' || state === 'streaming' || state === 'stopping';
  $('toggle').textContent = busy ? 'Stop' : 'Start';
  $('toggle').className = busy ? 'stop' : '';
  $('toggle').disabled = state === 'connecting' || state === 'stopping' || !snac.config;
}

function fail(code, message, hint) {
  if (snac.state === 'error') return;  // keep the first cause
  snac.error = { code, message, hint: hint || '' };
  $('error-title').textContent = `Error: ${code}`;
  $('error-text').textContent = `${message}${hint ? ' ' + hint : ''}`;
  $('error').style.display = 'block';
  teardown();
  setState('error');
}

function warn(text) { $('warn').textContent = text; $('warn').style.display = text ? 'block' : 'none'; }

const ms = (x) => (x === null || x === undefined || !isFinite(x)) ? '–' : `${x.toFixed(0)} ms`;
const kb = (bytes) => bytes >= 1e6 ? `${(bytes / 1e6).toFixed(2)} MB` : `${(bytes / 1e3).toFixed(1)} kB`;

function render() {
  const L = computeLatency();
  snac.latency = L;
  const pair = (s) => s ? `${ms(s.median)} (${ms(s.max)})` : '–';
  $('e2e').textContent = L.endToEnd ? ms(L.endToEnd.median) : '–';
  $('e2e-graph').textContent = pair(L.graph);
  $('e2e-device').textContent = ms(deviceMs);
  $('buffered').textContent = ms(snac.bufferedMs);
  $('total').textContent = L.total ? ms(L.total.median) : '–';
  $('algorithmic').textContent = pair(L.algorithmic);
  $('server').textContent = pair(L.server);
  $('transport').textContent = pair(L.transport);
  $('announced').textContent = snac.ready ? ms(1000 * snac.ready.algorithmic_latency_samples / rate) : '–';
  if (rate) {
    const secs = snac.sentSamples / rate;
    $('sent').textContent = `${secs.toFixed(1)} s (${snac.sentSamples} samples)`;
    $('received').textContent = `${(snac.receivedSamples / rate).toFixed(1)} s (${snac.receivedSamples} samples)`;
    $('tokens').textContent = `${snac.receivedTokens}`;
    if (secs > 0 && snac.ready) {
      const tps = snac.receivedTokens / secs;
      const kbps = tps * Math.log2(snac.ready.codebook_size) / 1000;
      $('bitrate').textContent = `${tps.toFixed(1)} tokens/s, ${kbps.toFixed(2)} kbps`;
      $('wire').textContent = `${kb(snac.sentBytes)} / ${kb(snac.receivedBytes)}`;
    }
  }
  $('underruns').textContent = `${snac.underruns} (${ms(snac.underrunMs)} silent)`;
}

function drawScope(samples) {
  const c = $('scope'), g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  g.strokeStyle = '#1f6feb';
  g.beginPath();
  const step = samples.length / c.width;
  for (let x = 0; x < c.width; x++) {
    const y = (0.5 - 0.5 * samples[Math.floor(x * step)]) * c.height;
    if (x === 0) g.moveTo(x, y); else g.lineTo(x, y);
  }
  g.stroke();
}

// ---- latency ----------------------------------------------------------------------------------------------
function summary(values) {
  if (!values.length) return null;
  const v = values.slice().sort((a, b) => a - b);
  return { median: v[Math.floor(v.length / 2)], max: v[v.length - 1], n: v.length };
}

// Medians and maxima over the last WINDOW_MS, in ms: the protocol's split of the latency of each received
// output frame (worst sample of the frame), and the mic-to-speaker delay measured on the AudioContext clock.
function computeLatency() {
  const now = performance.now();
  split = split.filter((s) => now - s.t < WINDOW_MS);
  e2e = e2e.filter((s) => now - s.t < WINDOW_MS);
  const pick = (k) => summary(split.map((s) => s[k]));
  const graph = summary(e2e.map((s) => s.graph));
  return {
    total: pick('total'), algorithmic: pick('algorithmic'), server: pick('server'), transport: pick('transport'),
    graph, deviceMs,
    endToEnd: graph && { median: graph.median + deviceMs, max: graph.max + deviceMs, n: graph.n },
    announced: snac.ready ? 1000 * snac.ready.algorithmic_latency_samples / rate : null,
  };
}

function captureFrame(i) {
  for (let k = chunks.length - 1; k >= 0; k--) {
    const c = chunks[k];
    if (c.start <= i && i < c.start + c.n) return c.frame + (i - c.start);
  }
  return null;
}

// ---- websocket messages -------------------------------------------------------------------------------------
function onBinary(buffer) {
  const tRecv = performance.now();
  snac.receivedBytes += buffer.byteLength;
  const h = new DataView(buffer, 0, HEADER_BYTES);
  const kind = h.getUint8(0), flags = h.getUint8(1);
  const start = Number(h.getBigUint64(4, true)), inputEnd = Number(h.getBigUint64(12, true));
  const count = h.getUint32(20, true), serverUs = h.getUint32(24, true);
  if (kind === 2) { snac.receivedTokens += count; return; }
  if (kind !== 1) return;
  const pcm16 = snac.ready.sample_format === 'pcm16';
  const raw = pcm16 ? new Int16Array(buffer, HEADER_BYTES, count) : new Float32Array(buffer, HEADER_BYTES, count);
  const samples = new Float32Array(count);
  let sq = 0;
  for (let k = 0; k < count; k++) { const x = pcm16 ? raw[k] / 32768 : raw[k]; samples[k] = x; sq += x * x; }
  if (start !== snac.receivedSamples) snac.outOfOrder += 1;
  snac.receivedSamples += count;
  snac.receivedSumSquares += sq;
  snac.audioFrames += 1;
  if (params.get('record')) snac.recorded.received.push(new Uint8Array(buffer.slice(HEADER_BYTES)));
  playback.port.postMessage({ type: 'audio', samples, start }, [samples.buffer]);
  if (flags & 1) { snac.finalFrames += 1; return; }  // the flush's tail: not paced by the mic
  // docs/protocol.md "Latency split", for the frame's first (oldest, so worst) sample i = start:
  // captured at t0 + (i + 1) / rate, computable once input_end samples had arrived.
  const i = start;
  const total = tRecv - (t0 + 1000 * (i + 1) / rate);
  const algorithmic = 1000 * (inputEnd - (i + 1)) / rate;
  const server = serverUs / 1000;
  split.push({ t: tRecv, total, algorithmic, server, transport: total - algorithmic - server });
  if (snac.audioFrames % 4 === 1) drawScope(raw instanceof Int16Array ? Float32Array.from(raw, (x) => x / 32768) : raw);
}

function onText(text) {
  let m;
  try { m = JSON.parse(text); } catch (e) { return fail('bad_message', `the server sent non-JSON text: ${text}`); }
  if (m.type === 'ready') return onReady(m);
  if (m.type === 'done') {
    snac.done = m;
    if (playback) playback.port.postMessage({ type: 'end' });
    return;
  }
  if (m.type === 'warning') return warn(`Server: ${m.message}`);
  if (m.type === 'error') {
    const hints = {
      server_full: `All ${snac.config ? snac.config.max_sessions : ''} session slots of the server are in use; try again later.`,
      unauthorized: 'Add ?token=... to the page address (the server was started with --token).',
      idle_timeout: 'The server received nothing for too long (is the microphone delivering audio?).',
    };
    return fail(m.code, m.message, hints[m.code]);
  }
}

function onReady(m) {
  snac.ready = m;
  $('model').textContent = `${m.model}${m.random_weights ? ' (RANDOM WEIGHTS: the output is noise)' : ''}, `
    + `${m.sample_rate} Hz, ${m.n_codebooks} codebooks x ${m.codebook_size}, step ${m.step_samples} samples; ${m.server}, session ${m.session}`;
  // Playback starts once one engine step plus the jitter margin is queued: output comes a step at a time.
  const jitterMs = Number(params.get('jitter_ms') || 40);
  playback = new AudioWorkletNode(ctx, 'snac-playback', {
    numberOfInputs: 0, outputChannelCount: [1],
    processorOptions: { prefill: m.step_samples + Math.round(jitterMs * rate / 1000), capacity: 20 * rate,
                        reportFrames: Math.round(rate / 20) },
  });
  playback.port.onmessage = (event) => onPlaybackStatus(event.data);
  playback.connect(ctx.destination);
  // Whole render quanta of about 20 ms per websocket message.
  const chunk = 128 * Math.max(1, Math.round(0.02 * rate / 128));
  capture = new AudioWorkletNode(ctx, 'snac-capture', { numberOfOutputs: 0, processorOptions: { chunk } });
  capture.port.onmessage = (event) => onCaptured(event.data);
  micSource.connect(capture);
  setState('streaming');
  const seconds = Number(params.get('seconds') || 0);
  if (seconds > 0) snac.autostopSamples = Math.round(seconds * rate);
}

function onCaptured({ samples, frame }) {
  if (snac.state !== 'streaming' || !ws || ws.readyState !== WebSocket.OPEN) return;
  let n = samples.length;
  if (snac.autostopSamples) n = Math.min(n, snac.autostopSamples - snac.sentSamples);
  if (n <= 0) return;
  const x = samples.subarray(0, n);
  let payload;
  if (snac.ready.sample_format === 'pcm16') {
    payload = new Int16Array(n);
    for (let k = 0; k < n; k++) payload[k] = Math.max(-32768, Math.min(32767, Math.round(x[k] * 32768)));
    for (let k = 0; k < n; k++) snac.sentSumSquares += (payload[k] / 32768) ** 2;
  } else {
    payload = new Float32Array(x);
    for (let k = 0; k < n; k++) snac.sentSumSquares += x[k] * x[k];
  }
  chunks.push({ start: snac.sentSamples, n, frame });
  if (chunks.length > 1000) chunks.splice(0, 500);
  ws.send(payload.buffer);
  snac.sentSamples += n;
  snac.sentBytes += payload.byteLength;
  // Real-time clock fit for the protocol's split: sample i was captured at about t0 + (i + 1) / rate; the
  // earliest arrival (relative to the stream position) is the best estimate of t0.
  t0 = Math.min(t0, performance.now() - 1000 * snac.sentSamples / rate);
  if (params.get('record')) snac.recorded.sent.push(new Uint8Array(payload.buffer));
  if (snac.autostopSamples && snac.sentSamples >= snac.autostopSamples) stop();
}

function onPlaybackStatus(s) {
  snac.underruns = s.underruns;
  snac.underrunAt = s.underrunAt;
  snac.underrunMs = 1000 * s.silentFrames / rate;
  snac.bufferedMs = 1000 * s.buffered / rate;
  snac.played = s.played;
  snac.drained = s.drained;
  if (s.mapped) {
    const f = captureFrame(s.mapped.played);
    if (f !== null) e2e.push({ t: performance.now(), graph: 1000 * (s.mapped.frame - f) / rate });
  }
  if (s.drained && snac.done && snac.state === 'stopping') { render(); teardown(); setState('done'); }
}

// ---- start / stop -----------------------------------------------------------------------------------------
async function loadConfig() {
  const r = await fetch(`/config.json?origin=${encodeURIComponent(location.origin)}`, { cache: 'no-store' });
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  return r.json();
}

function wsUrl() {
  if (params.get('ws')) return params.get('ws');
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/`;
}

async function start() {
  $('error').style.display = 'none';
  warn('');
  Object.assign(snac, { error: null, ready: null, done: null, closeCode: null, sentSamples: 0, sentBytes: 0,
    sentSumSquares: 0, receivedSamples: 0, receivedBytes: 0, receivedSumSquares: 0, receivedTokens: 0,
    audioFrames: 0, outOfOrder: 0, finalFrames: 0, underruns: 0, underrunMs: 0, bufferedMs: 0, played: 0,
    drained: false, autostopSamples: 0, recorded: { sent: [], received: [] } });
  chunks = []; split = []; e2e = []; t0 = Infinity; opened = false;
  setState('connecting');
  try {
    rate = snac.config.sample_rate;
    ctx = new AudioContext({ sampleRate: rate, latencyHint: 'interactive' });
    if (ctx.sampleRate !== rate) throw new Error(`the browser made a ${ctx.sampleRate} Hz AudioContext, not ${rate} Hz`);
    await ctx.audioWorklet.addModule('worklet.js');
    const aec = params.get('aec') === '1';
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: aec, noiseSuppression: false, autoGainControl: false } });
    micSource = ctx.createMediaStreamSource(micStream);
    if (ctx.state !== 'running') await ctx.resume();
    const inputLatency = micStream.getAudioTracks()[0].getSettings().latency || 0;
    deviceMs = 1000 * (inputLatency + (ctx.baseLatency || 0) + (ctx.outputLatency || 0));
  } catch (e) {
    const denied = e && (e.name === 'NotAllowedError' || e.name === 'SecurityError');
    return fail(denied ? 'microphone_denied' : 'audio_setup', `${e.name || 'Error'}: ${e.message}`,
      denied ? 'Allow microphone access for this page (it needs http://127.0.0.1 or localhost, or https).' : '');
  }
  if (snac.state !== 'connecting') return;  // stopped meanwhile
  ws = new WebSocket(wsUrl());
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => {
    opened = true;
    const hello = { type: 'hello', protocol: 1, kind: 'roundtrip', sample_rate: rate,
                    sample_format: params.get('format') || 'pcm16' };
    if (params.get('token')) hello.auth = params.get('token');
    ws.send(JSON.stringify(hello));
  };
  ws.onmessage = (event) => (typeof event.data === 'string' ? onText(event.data) : onBinary(event.data));
  ws.onclose = (event) => onClose(event);
}

async function onClose(event) {
  snac.closeCode = event.code;
  ws = null;
  if (snac.state === 'error' || snac.state === 'done' || snac.state === 'idle') return;
  if (snac.done) return;  // flushed: playback drains, then 'done'
  if (!opened) {
    // The browser hides why a handshake failed (an HTTP 403 from the Origin check looks like any other
    // failure): ask the server over plain HTTP whether this page's origin is accepted.
    let cfg = null;
    try { cfg = await loadConfig(); } catch (e) { /* unreachable */ }
    if (!cfg) return fail('unreachable', `cannot reach the server at ${wsUrl()}.`, 'Is snac-stream serve running?');
    if (cfg.origin_allowed === false) {
      return fail('bad_origin', `the server refuses websocket connections from pages at ${location.origin}.`,
        `Open the page from a loopback address (e.g. http://127.0.0.1:${location.port || 80}/) or restart the `
        + `server with --allow-origin ${location.origin}.`);
    }
    return fail('handshake_failed', `the websocket handshake with ${wsUrl()} failed (close code ${event.code}).`);
  }
  fail('disconnected', `the connection closed unexpectedly (close code ${event.code}${event.reason ? ', ' + event.reason : ''}).`,
    'The server may have stopped; press Start to reconnect.');
}

function stop() {
  if (snac.state === 'connecting' && !snac.ready) { teardown(); setState('idle'); return; }
  if (snac.state !== 'streaming') return;
  setState('stopping');
  stopCapture();
  if (playback) playback.port.postMessage({ type: 'flushing' });
  // flush: the server pads the end as offline encode does, sends the tail (FINAL frames), then done.
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'flush' }));
}

function stopCapture() {
  if (capture) { capture.port.postMessage('stop'); capture.port.onmessage = null; capture.disconnect(); capture = null; }
  if (micSource) { micSource.disconnect(); micSource = null; }
  if (micStream) { micStream.getTracks().forEach((t) => t.stop()); micStream = null; }
}

function teardown() {
  stopCapture();
  if (ws) { const w = ws; ws = null; w.onclose = null; try { w.close(1000); } catch (e) { /* closed */ } }
  if (playback) { playback.port.onmessage = null; playback.disconnect(); playback = null; }
  if (ctx) { ctx.close(); ctx = null; }
}

function toBase64(parts) {
  let s = '';
  for (const p of parts) for (let k = 0; k < p.length; k += 0x8000) s += String.fromCharCode.apply(null, p.subarray(k, k + 0x8000));
  return btoa(s);
}

// ---- boot -------------------------------------------------------------------------------------------------
$('toggle').onclick = () => (snac.state === 'streaming' || snac.state === 'connecting' ? stop() : start());
$('endpoint').textContent = wsUrl();
setInterval(render, 200);
loadConfig().then((cfg) => {
  snac.config = cfg;
  $('model').textContent = `${cfg.model}${cfg.random_weights ? ' (RANDOM WEIGHTS: the output is noise)' : ''}, `
    + `${cfg.sample_rate} Hz; ${cfg.server}`;
  setState('idle');
  if (!window.isSecureContext) warn('This page is not a secure context: browsers only give microphone access on https, localhost or 127.0.0.1.');
  if (params.get('autostart') === '1') start();
}).catch((e) => fail('unreachable', `cannot load ${location.origin}/config.json (${e.message}).`, 'Is snac-stream serve running?'));
