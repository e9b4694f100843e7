// snac-stream browser client: microphone -> websocket roundtrip session (docs/protocol.md) -> speaker.
//
// Wire formats: PCM16 (default) or float32 at the model's rate: the AudioContext runs at the model's sample rate
// (read from /config.json), so the mic is resampled by the browser and the samples go to the server as they
// are. Opus: the AudioContext runs at 48 kHz, Opus's own rate, and opus.js codes both ways with WebCodecs, in
// the protocol's `webm` format; the server converts to and from the model's rate.
// `window.snac` holds the live state (read by the tests and handy in the console). URL options: autostart=1,
// seconds=N (stop after N s of audio sent), format=pcm16|float32|opus, opus_kbps=N (Opus bitrate, both ways;
// default 24), jitter_ms=N (playback margin beyond one engine step), token=..., ws=ws://host:port, record=1
// (keep what went over the wire: snac.sentBase64(), snac.receivedBase64(); and the audio as float32:
// snac.capturedBase64() sent, snac.decodedBase64() played).
'use strict';

const params = new URLSearchParams(location.search);
const HEADER_BYTES = 32;
const WINDOW_MS = 5000;

const snac = {
  state: 'idle',  // idle | connecting | streaming | stopping | done | error
  error: null,    // {code, message, hint}
  config: null,   // /config.json
  format: null,   // the session's wire format: pcm16 | float32 | opus
  encoderMs: null,  // Opus: the delay of the page's encoder (a frame and its look-ahead), once it has coded
  opusUnavailable: null,  // why the Opus option is off (null: it is on)
  ready: null,    // the server's ready message
  sentSamples: 0, sentBytes: 0, sentSumSquares: 0,
  receivedSamples: 0, receivedBytes: 0, receivedSumSquares: 0, receivedTokens: 0,
  receivedItems: 0, receivedAudioBytes: 0,  // output items (samples; bytes for Opus) and audio payload bytes
  audioFrames: 0, outOfOrder: 0, finalFrames: 0,
  underruns: 0, underrunMs: 0, bufferedMs: 0, played: 0, drained: false,
  done: null, closeCode: null,
  latency: null,  // see computeLatency()
  wire: null,     // see wireFigures()
  recorded: { sent: [], received: [], captured: [], decoded: [] },
  sentBase64: () => toBase64(snac.recorded.sent),
  receivedBase64: () => toBase64(snac.recorded.received),
  capturedBase64: () => toBase64(snac.recorded.captured),
  decodedBase64: () => toBase64(snac.recorded.decoded),
};
window.snac = snac;

const $ = (id) => document.getElementById(id);
let ctx = null, ws = null, micStream = null, micSource = null, capture = null, playback = null;
let uplink = null, downlink = null;  // Opus only (opus.js)
let rate = 0, t0 = Infinity, opened = false;
const opusBitrate = 1000 * Number(params.get('opus_kbps') || 24);
let chunks = [];      // {start, n, frame}: capture frame of each sent chunk's first sample
let sentMap = [];     // Opus: {bytes, samples}: input bytes sent -> samples the page had captured to code them
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
  $('format').disabled = busy || !snac.config;
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
  $('announced').textContent = ms(L.announced);
  $('conversion').textContent = L.conversion ? `${ms(L.conversion.input)} in + ${ms(L.conversion.output)} out` : '–';
  $('encoder').textContent = ms(L.encoder);
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
  const W = snac.wire = wireFigures();
  if (W) {
    $('audio-rate').textContent = `${(W.up / 1e3).toFixed(1)} / ${(W.down / 1e3).toFixed(1)} kB/s`;
    $('saved').textContent = `${kb(W.saved)}/s (${(100 * W.saved / (2 * W.pcm16)).toFixed(0)} %)`;
    $('saved').title = `PCM16 at ${snac.ready.sample_rate} Hz: ${kb(W.pcm16)}/s each way`;
  }
  $('underruns').textContent = `${snac.underruns} (${ms(snac.underrunMs)} silent)`;
}

// Audio bytes per second of audio, each way, and what they save against PCM16 at the model's rate (the default
// format: 2 bytes a sample). Frame headers and tokens are the same in every format and left out.
function wireFigures() {
  if (!snac.ready || !rate || !snac.sentSamples || !snac.receivedSamples) return null;
  const up = snac.sentBytes / (snac.sentSamples / rate), down = snac.receivedAudioBytes / (snac.receivedSamples / rate);
  const pcm16 = 2 * snac.ready.sample_rate;
  return { up, down, pcm16, saved: 2 * pcm16 - up - down };
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
    announced: snac.ready ? 1000 * snac.ready.algorithmic_latency_samples / snac.ready.sample_rate : null,
    // what ready announces the server's format conversions add (part of `announced`), and the page's own Opus
    // encoder: a frame plus its look-ahead (part of the measured algorithmic delay)
    conversion: snac.ready ? { input: 1000 * snac.ready.input_latency_samples / snac.ready.input_rate,
                               output: 1000 * snac.ready.output_latency_samples / snac.ready.output_rate } : null,
    encoder: snac.encoderMs,
  };
}

// The capture count at which the page could send stream sample `needed - 1`: the end of the chunk holding it.
function chunkEnd(needed) {
  for (let k = chunks.length - 1; k >= 0; k--) {
    const c = chunks[k];
    if (c.start < needed && needed <= c.start + c.n) return c.start + c.n;
  }
  return needed;
}

// A frame's input_end as captured samples: for Opus (bytes) what the page had captured to send that many bytes.
function inputSamples(inputEnd) {
  if (!uplink) return inputEnd;
  let k = 0;
  while (k + 1 < sentMap.length && sentMap[k + 1].bytes <= inputEnd) k++;
  sentMap.splice(0, k);  // audio frames' input_end only grows
  return sentMap.length && sentMap[0].bytes <= inputEnd ? sentMap[0].samples : 0;
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
  if (start !== snac.receivedItems) snac.outOfOrder += 1;
  snac.receivedItems += count;
  snac.receivedAudioBytes += buffer.byteLength - HEADER_BYTES;
  snac.audioFrames += 1;
  if (params.get('record')) snac.recorded.received.push(new Uint8Array(buffer.slice(HEADER_BYTES)));
  let first = start;  // stream position of the frame's first sample (Opus: of its first packet; null: none)
  if (downlink) {
    try {
      first = downlink.push(new Uint8Array(buffer, HEADER_BYTES));
    } catch (e) {
      return fail('bad_opus', `the server's Opus stream: ${e.message}`);
    }
  } else {
    const pcm16 = snac.ready.sample_format === 'pcm16';
    const raw = pcm16 ? new Int16Array(buffer, HEADER_BYTES, count) : new Float32Array(buffer, HEADER_BYTES, count);
    const samples = new Float32Array(count);
    for (let k = 0; k < count; k++) samples[k] = pcm16 ? raw[k] / 32768 : raw[k];
    play(samples, start);
  }
  if (flags & 1) { snac.finalFrames += 1; return; }  // the flush's tail: not paced by the mic
  if (first === null) return;  // Opus: container bytes, no whole packet yet
  // docs/protocol.md "Latency split", for the frame's first (oldest, so worst) sample i:
  // captured at t0 + (i + 1) / rate, computable once input_end samples had arrived.
  const i = first;
  const total = tRecv - (t0 + 1000 * (i + 1) / rate);
  const algorithmic = 1000 * (inputSamples(inputEnd) - (i + 1)) / rate;
  const server = serverUs / 1000;
  split.push({ t: tRecv, total, algorithmic, server, transport: total - algorithmic - server });
}

// Decoded audio at the stream position `start` (samples at the AudioContext's rate) -> the playback worklet.
function play(samples, start) {
  if (!playback) return;
  let sq = 0;
  for (let k = 0; k < samples.length; k++) sq += samples[k] * samples[k];
  snac.receivedSamples += samples.length;
  snac.receivedSumSquares += sq;
  if (params.get('record')) snac.recorded.decoded.push(new Uint8Array(samples.slice().buffer));
  if (snac.audioFrames % 4 === 1) drawScope(samples);
  playback.port.postMessage({ type: 'audio', samples, start }, [samples.buffer]);
}

function onText(text) {
  let m;
  try { m = JSON.parse(text); } catch (e) { return fail('bad_message', `the server sent non-JSON text: ${text}`); }
  if (m.type === 'ready') return onReady(m);
  if (m.type === 'done') {
    snac.done = m;
    // Opus: the decoder may still hold the last packets.
    const decoded = downlink ? downlink.flush() : Promise.resolve();
    decoded.then(() => { if (playback) playback.port.postMessage({ type: 'end' }); },
      (e) => fail('bad_opus', `decoding the server's Opus stream: ${e.message}`));
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
  const wire = snac.format === 'opus' ? `Opus in WebM at ${m.opus_bitrate / 1000} kbps, 48 kHz`
    : `${m.sample_format} at ${m.sample_rate} Hz`;
  $('model').textContent = `${m.model}${m.random_weights ? ' (RANDOM WEIGHTS: the output is noise)' : ''}, `
    + `${m.sample_rate} Hz, ${m.n_codebooks} codebooks x ${m.codebook_size}, step ${m.step_samples} samples; `
    + `${wire} both ways; ${m.server}, session ${m.session}`;
  if (snac.format === 'opus') {
    const codecFailed = (e) => fail('opus_error',
      `the browser's Opus codec failed: ${e.name || 'Error'}: ${e.message}`);
    try {
      uplink = new SnacOpus.Uplink(opusBitrate, onOpusPacket, codecFailed);
      downlink = new SnacOpus.Downlink(play, codecFailed);
    } catch (e) { return codecFailed(e); }
  }
  // Playback starts once one engine step plus the jitter margin is queued: output comes a step at a time.
  const jitterMs = Number(params.get('jitter_ms') || 40);
  playback = new AudioWorkletNode(ctx, 'snac-playback', {
    numberOfInputs: 0, outputChannelCount: [1],
    processorOptions: { prefill: Math.round((m.step_samples / m.sample_rate + jitterMs / 1000) * rate),
                        capacity: 20 * rate, reportFrames: Math.round(rate / 20) },
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
  chunks.push({ start: snac.sentSamples, n, frame });
  if (chunks.length > 1000) chunks.splice(0, 500);
  if (params.get('record')) snac.recorded.captured.push(new Uint8Array(x.slice().buffer));
  if (uplink) {  // sent by onOpusPacket as the encoder codes it
    for (let k = 0; k < n; k++) snac.sentSumSquares += x[k] * x[k];
    uplink.push(x.slice(), snac.sentSamples);
  } else {
    let payload;
    if (snac.ready.sample_format === 'pcm16') {
      payload = new Int16Array(n);
      for (let k = 0; k < n; k++) payload[k] = Math.max(-32768, Math.min(32767, Math.round(x[k] * 32768)));
      for (let k = 0; k < n; k++) snac.sentSumSquares += (payload[k] / 32768) ** 2;
    } else {
      payload = new Float32Array(x);
      for (let k = 0; k < n; k++) snac.sentSumSquares += x[k] * x[k];
    }
    ws.send(payload.buffer);
    snac.sentBytes += payload.byteLength;
    if (params.get('record')) snac.recorded.sent.push(new Uint8Array(payload.buffer));
  }
  snac.sentSamples += n;
  // Real-time clock fit for the protocol's split: sample i was captured at about t0 + (i + 1) / rate; the
  // earliest arrival (relative to the stream position) is the best estimate of t0.
  t0 = Math.min(t0, performance.now() - 1000 * snac.sentSamples / rate);
  if (snac.autostopSamples && snac.sentSamples >= snac.autostopSamples) stop();
}

// One WebM message from the Opus encoder, `needed` the capture count it took.
function onOpusPacket(bytes, needed) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(bytes);
  snac.sentBytes += bytes.length;
  if (snac.encoderMs === null) snac.encoderMs = SnacOpus.FRAME_US / 1000 + 1000 * uplink.preSkip / SnacOpus.RATE;
  sentMap.push({ bytes: snac.sentBytes, samples: chunkEnd(needed) });
  if (params.get('record')) snac.recorded.sent.push(bytes);
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
    receivedItems: 0, receivedAudioBytes: 0, wire: null, encoderMs: null,
    audioFrames: 0, outOfOrder: 0, finalFrames: 0, underruns: 0, underrunMs: 0, bufferedMs: 0, played: 0,
    drained: false, autostopSamples: 0, recorded: { sent: [], received: [], captured: [], decoded: [] } });
  chunks = []; split = []; e2e = []; sentMap = []; t0 = Infinity; opened = false;
  snac.format = $('format').value;
  setState('connecting');
  if (!snac.format) {
    return fail('bad_format', `unknown format=${params.get('format')} in the page address.`, 'Use pcm16, float32 or opus.');
  }
  if (snac.format === 'opus' && snac.opusUnavailable) {
    return fail('opus_unavailable', `Opus is not available: ${snac.opusUnavailable}`, 'Choose PCM16.');
  }
  try {
    rate = snac.format === 'opus' ? SnacOpus.RATE : snac.config.sample_rate;
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
    const hello = { type: 'hello', protocol: 1, kind: 'roundtrip' };
    // Opus: WebM both ways, at 48 kHz (the format's default rate); the server converts to the model's rate.
    Object.assign(hello, snac.format === 'opus' ? { sample_format: 'webm', opus_bitrate: opusBitrate }
      : { sample_rate: rate, sample_format: snac.format });
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
  const flush = () => { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'flush' })); };
  // Opus: the encoder's last packets go first, the stream trimmed to what was captured.
  if (!uplink) return flush();
  uplink.end(snac.sentSamples).then(flush, (e) => fail('opus_error', `the browser's Opus encoder failed: ${e.message}`));
}

function stopCapture() {
  if (capture) { capture.port.postMessage('stop'); capture.port.onmessage = null; capture.disconnect(); capture = null; }
  if (micSource) { micSource.disconnect(); micSource = null; }
  if (micStream) { micStream.getTracks().forEach((t) => t.stop()); micStream = null; }
}

function teardown() {
  stopCapture();
  if (ws) { const w = ws; ws = null; w.onclose = null; try { w.close(1000); } catch (e) { /* closed */ } }
  if (uplink) { uplink.close(); uplink = null; }
  if (downlink) { downlink.close(); downlink = null; }
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
// Why this page cannot offer Opus (null: it can): the server must code it (PyAV) and the browser (WebCodecs).
async function opusUnavailable(cfg) {
  if (!(cfg.formats || []).includes('webm')) {
    return "the server cannot code Opus (it needs PyAV: pip install 'snac-stream[opus]').";
  }
  return SnacOpus.unsupported(opusBitrate);
}

loadConfig().then(async (cfg) => {
  snac.opusUnavailable = await opusUnavailable(cfg);
  const opus = $('format').querySelector('option[value=opus]');
  opus.textContent = `Opus (WebM, ${opusBitrate / 1000} kbps)`;
  opus.disabled = !!snac.opusUnavailable;
  $('format-note').textContent = snac.opusUnavailable ? `Opus is off: ${snac.opusUnavailable}` : '';
  $('format').value = params.get('format') || 'pcm16';
  snac.config = cfg;
  $('model').textContent = `${cfg.model}${cfg.random_weights ? ' (RANDOM WEIGHTS: the output is noise)' : ''}, `
    + `${cfg.sample_rate} Hz; ${cfg.server}`;
  setState('idle');
  if (!window.isSecureContext) warn('This page is not a secure context: browsers only give microphone access on https, localhost or 127.0.0.1.');
  if (params.get('autostart') === '1') start();
}).catch((e) => fail('unreachable', `cannot load ${location.origin}/config.json (${e.message}).`, 'Is snac-stream serve running?'));
