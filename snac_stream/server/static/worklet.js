// AudioWorklet processors of the snac-stream browser client (loaded by app.js with audioWorklet.addModule).
//
// Both run in the page's AudioContext, created at the model's sample rate, so samples go to and come from
// the server without resampling, and both see the same clock (currentFrame): the mic-to-speaker delay of
// stream sample i is (frame at which output sample i is played) - (frame at which input sample i was captured).

// Capture: mono mic samples in chunks of `chunk` frames, each posted with the context frame of its first
// sample. A chunk never spans a gap in the input (e.g. before the mic delivers), so its frames are contiguous.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunk = options.processorOptions.chunk;
    this.buf = new Float32Array(this.chunk);
    this.fill = 0;
    this.firstFrame = 0;
    this.nextFrame = -1;
    this.stopped = false;
    this.port.onmessage = (event) => {
      if (event.data === 'stop') { this.post(); this.stopped = true; }
    };
  }

  post() {
    if (this.fill === 0) return;
    const samples = this.buf.slice(0, this.fill);
    this.port.postMessage({ samples, frame: this.firstFrame }, [samples.buffer]);
    this.fill = 0;
  }

  process(inputs) {
    if (this.stopped) return false;
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;  // no input connected yet
    if (this.fill > 0 && currentFrame !== this.nextFrame) this.post();  // a gap: keep chunks contiguous
    const n = channels[0].length;
    for (let k = 0; k < n; k++) {
      if (this.fill === 0) this.firstFrame = currentFrame + k;
      let x = 0;
      for (let c = 0; c < channels.length; c++) x += channels[c][k];
      this.buf[this.fill++] = x / channels.length;  // a stereo device is mixed down to mono
      if (this.fill === this.chunk) this.post();
    }
    this.nextFrame = currentFrame + n;
    return true;
  }
}

// Playback with a jitter buffer: output arrives in bursts of about one engine step, so playback starts (and
// restarts after an underrun) only once `prefill` samples are queued. An underrun plays silence and is
// counted once per dry spell (not after the input stopped: the flush's tail is computed at once, not paced).
// Status (played position and its frame, buffer level, underruns) is posted every `reportFrames` frames.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.prefill = o.prefill;
    this.ring = new Float32Array(o.capacity);
    this.readIndex = 0;   // stream position of the next sample to play
    this.writeIndex = 0;  // stream position after the last sample queued
    this.playing = false;
    this.ended = false;
    this.flushing = false;
    this.underruns = 0;
    this.silentFrames = 0;  // silence played while primed-and-starved (underrun time)
    this.dropped = 0;
    this.underrunAt = [];  // stream positions where playback ran dry
    this.reportFrames = o.reportFrames;
    this.sinceReport = 0;
    this.port.onmessage = (event) => {
      const m = event.data;
      if (m.type === 'audio') this.push(m.samples, m.start);
      else if (m.type === 'flushing') this.flushing = true;  // input stopped: the tail comes at once, unpaced
      else if (m.type === 'end') this.ended = true;
    };
  }

  push(samples, start) {
    if (this.writeIndex === 0 && this.readIndex === 0) { this.readIndex = start; this.writeIndex = start; }
    const free = this.ring.length - (this.writeIndex - this.readIndex);
    const n = Math.min(samples.length, free);
    this.dropped += samples.length - n;
    for (let k = 0; k < n; k++) this.ring[(this.writeIndex + k) % this.ring.length] = samples[k];
    this.writeIndex += n;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    const queued = this.writeIndex - this.readIndex;
    if (!this.playing && queued > 0 && (queued >= this.prefill || this.ended)) this.playing = true;
    let mapped = null;
    if (this.playing) {
      mapped = { played: this.readIndex, frame: currentFrame };
      const n = Math.min(out.length, queued);
      for (let k = 0; k < n; k++) out[k] = this.ring[(this.readIndex + k) % this.ring.length];
      out.fill(0, n);
      this.readIndex += n;
      if (n < out.length) {
        this.playing = false;
        if (!this.ended && !this.flushing) {
          this.underruns += 1;
          this.silentFrames += out.length - n;
          this.underrunAt.push(this.readIndex);
        }
      }
    } else {
      out.fill(0);
      if (this.readIndex > 0 && !this.ended && !this.flushing) this.silentFrames += out.length;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= this.reportFrames || (this.ended && queued === 0)) {
      this.sinceReport = 0;
      this.port.postMessage({
        type: 'status', mapped, buffered: this.writeIndex - this.readIndex, played: this.readIndex,
        underruns: this.underruns, underrunAt: this.underrunAt.slice(-20), silentFrames: this.silentFrames, dropped: this.dropped,
        drained: this.ended && this.writeIndex === this.readIndex,
      });
    }
    return true;
  }
}

registerProcessor('snac-capture', CaptureProcessor);
registerProcessor('snac-playback', PlaybackProcessor);
