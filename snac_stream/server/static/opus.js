// Opus on the wire for the browser client (loaded before app.js): the protocol's `webm` format both ways
// (docs/protocol.md, "Formats and sample rates"), coded by the browser's own WebCodecs AudioEncoder and
// AudioDecoder. WebCodecs hands over each 20 ms packet as soon as it is coded and decodes packets one by one,
// so the only delay Opus adds on the page is the encoder's frame and look-ahead; MediaRecorder would buffer
// (Chromium codes 60 ms frames there) and Media Source playback keeps a media element's own buffer.
// WebM rather than Ogg: a block costs 6 bytes of framing a packet, an Ogg page 28.
'use strict';

const SnacOpus = (() => {
  const RATE = 48000;  // Opus streams are 48 kHz (the protocol's only rate for opus/webm)
  const FRAME_US = 20000;
  const CLUSTER_MS = 5000;  // a block's timecode is an int16 of ms from its cluster's
  const ID = { EBML: 0x1A45DFA3, SEGMENT: 0x18538067, CLUSTER: 0x1F43B675, TRACKS: 0x1654AE6B, TIMECODE: 0xE7,
    SIMPLE_BLOCK: 0xA3, BLOCK_GROUP: 0xA0, BLOCK: 0xA1, DISCARD_PADDING: 0x75A2, TRACK_ENTRY: 0xAE,
    TRACK_NUMBER: 0xD7, CODEC_ID: 0x86, CODEC_PRIVATE: 0x63A2 };
  const UNKNOWN_SIZE = [0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
  // OpusHead (RFC 7845): version 1, mono, pre-skip 312 (libopus's 6.5 ms look-ahead), 48 kHz, gain 0, family 0
  const DEFAULT_HEAD = Uint8Array.from([...new TextEncoder().encode('OpusHead'), 1, 1, 0x38, 0x01, 0x80, 0xBB, 0, 0, 0, 0, 0]);

  // Samples (48 kHz) in an Opus packet, from its TOC byte (RFC 6716, section 3.1).
  function packetSamples(p) {
    const config = p[0] >> 3, code = p[0] & 3;
    const frame = config < 12 ? [480, 960, 1920, 2880][config & 3]
      : config < 16 ? [480, 960][config & 1] : [120, 240, 480, 960][config & 3];
    return frame * (code === 0 ? 1 : code === 3 ? (p[1] & 0x3F) : 2);
  }

  // ---- WebM writing (the subset the server reads: docs/protocol.md) -------------------------------------------
  function concat(parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let k = 0;
    for (const p of parts) { out.set(p, k); k += p.length; }
    return out;
  }
  const bigEndian = (value, length) =>
    Array.from({ length }, (_, k) => Math.floor(value / 2 ** (8 * (length - 1 - k))) % 256);
  const byteLength = (v) => { let n = 1; while (v >= 256 ** n) n += 1; return n; };
  const idBytes = (id) => bigEndian(id, byteLength(id));
  function sizeBytes(n) {
    let length = 1;
    while (n >= 2 ** (7 * length) - 1) length += 1;
    const b = bigEndian(n, length);
    b[0] |= 0x80 >> (length - 1);
    return b;
  }
  const element = (id, ...payload) => {
    const body = concat(payload.map((p) => (p instanceof Uint8Array ? p : Uint8Array.from(p))));
    return concat([Uint8Array.from(idBytes(id)), Uint8Array.from(sizeBytes(body.length)), body]);
  };
  const uint = (id, v) => element(id, bigEndian(v, byteLength(v)));
  const text = (id, s) => element(id, new TextEncoder().encode(s));
  function int64(id, v) {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigInt64(0, BigInt(v));
    return element(id, b);
  }
  function float64(id, v) {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setFloat64(0, v);
    return element(id, b);
  }

  function webmHeader(opusHead) {
    const ebml = element(ID.EBML, uint(0x4286, 1), uint(0x42F7, 1), uint(0x42F2, 4), uint(0x42F3, 8),
      text(0x4282, 'webm'), uint(0x4287, 4), uint(0x4285, 2));
    const info = element(0x1549A966, uint(0x2AD7B1, 1000000), text(0x4D80, 'snac-stream page'),
      text(0x5741, 'snac-stream page'));
    const track = element(ID.TRACK_ENTRY, uint(ID.TRACK_NUMBER, 1), uint(0x73C5, 1), uint(0x83, 2),
      text(ID.CODEC_ID, 'A_OPUS'), element(ID.CODEC_PRIVATE, opusHead),
      element(0xE1, float64(0xB5, RATE), uint(0x9F, 1)));
    return concat([ebml, Uint8Array.from([...idBytes(ID.SEGMENT), ...UNKNOWN_SIZE]), info, element(ID.TRACKS, track)]);
  }

  // ---- WebM reading: the server's stream, cut anywhere (a port of snac_stream/formats.py's reader) ------------
  class WebMReader {
    constructor() { this.buffer = new Uint8Array(0); this.skip = 0; this.head = null; this.track = null; }

    static vint(b, pos, keepMarker) {
      if (pos >= b.length) return null;
      if (b[pos] === 0) throw new Error('not a WebM stream: invalid EBML variable-size integer');
      const length = Math.clz32(b[pos]) - 23;
      if (pos + length > b.length) return null;
      let value = keepMarker ? b[pos] : b[pos] & (0xFF >> length);
      for (let k = 1; k < length; k++) value = value * 256 + b[pos + k];
      return { value, length, unknown: !keepMarker && value === 2 ** (7 * length) - 1 };
    }

    static children(body) {  // [[id, body], ...]
      const out = [];
      for (let pos = 0; pos < body.length;) {
        const id = WebMReader.vint(body, pos, true), size = id && WebMReader.vint(body, pos + id.length, false);
        if (!size || pos + id.length + size.length + size.value > body.length) {
          throw new Error('malformed WebM: a child element overruns its parent');
        }
        const start = pos + id.length + size.length;
        out.push([id.value, body.subarray(start, start + size.value)]);
        pos = start + size.value;
      }
      return out;
    }

    // Bytes in; [{packet, discard}] out: each Opus packet of the stream's Opus track, with the samples (48 kHz)
    // its DiscardPadding trims from the end of the stream.
    push(data) {
      const out = [];
      const joined = new Uint8Array(this.buffer.length + data.length);
      joined.set(this.buffer); joined.set(data, this.buffer.length);
      let b = joined;
      for (;;) {
        if (this.skip) {
          const n = Math.min(this.skip, b.length);
          b = b.subarray(n); this.skip -= n;
          if (this.skip) break;
        }
        const id = WebMReader.vint(b, 0, true), size = id && WebMReader.vint(b, id.length, false);
        if (!size) break;
        const start = id.length + size.length;
        if (id.value === ID.SEGMENT || id.value === ID.CLUSTER) { b = b.subarray(start); continue; }  // descend
        if (size.unknown) throw new Error(`WebM element 0x${id.value.toString(16)} has an unknown size`);
        if (id.value === ID.TRACKS || id.value === ID.SIMPLE_BLOCK || id.value === ID.BLOCK_GROUP) {
          if (b.length < start + size.value) break;
          const body = b.slice(start, start + size.value);
          b = b.subarray(start + size.value);
          if (id.value === ID.TRACKS) this.tracks(body);
          else { const block = this.block(body, id.value === ID.SIMPLE_BLOCK); if (block) out.push(block); }
          continue;
        }
        b = b.subarray(start); this.skip = size.value;  // anything else is skipped unbuffered
      }
      this.buffer = b.slice();
      return out;
    }

    tracks(body) {
      for (const [id, entry] of WebMReader.children(body)) {
        if (id !== ID.TRACK_ENTRY || this.track !== null) continue;
        const fields = new Map(WebMReader.children(entry));
        if (fields.has(ID.CODEC_ID) && new TextDecoder().decode(fields.get(ID.CODEC_ID)) === 'A_OPUS') {
          this.track = fields.has(ID.TRACK_NUMBER) ? fields.get(ID.TRACK_NUMBER)[0] : 1;
          this.head = fields.get(ID.CODEC_PRIVATE) || null;
        }
      }
      if (!this.head) throw new Error('the WebM stream has no Opus track with an OpusHead');
    }

    block(body, simple) {
      let discard = 0;
      if (!simple) {
        const fields = new Map(WebMReader.children(body));
        if (!fields.has(ID.BLOCK)) return null;
        const pad = fields.get(ID.DISCARD_PADDING);
        if (pad) {
          let ns = 0;  // a signed big-endian integer of up to 8 bytes
          for (const x of pad) ns = ns * 256 + x;
          if (pad[0] & 0x80) ns -= 2 ** (8 * pad.length);
          discard = Math.max(0, Math.round(ns * RATE / 1e9));
        }
        body = fields.get(ID.BLOCK);
      }
      const track = WebMReader.vint(body, 0, false);
      if (!track || this.track === null) throw new Error('malformed WebM: a block before the track list');
      if (track.value !== this.track) return null;
      return { packet: body.slice(track.length + 3), discard };
    }
  }

  // ---- what the browser can do --------------------------------------------------------------------------------
  // null if this browser can code Opus at `bitrate` both ways, else why not (shown next to the disabled option).
  async function unsupported(bitrate) {
    if (typeof AudioEncoder === 'undefined' || typeof AudioDecoder === 'undefined') {
      return window.isSecureContext
        ? 'this browser has no WebCodecs AudioEncoder/AudioDecoder.'
        : 'WebCodecs (AudioEncoder/AudioDecoder) needs a secure context: https, localhost or 127.0.0.1.';
    }
    try {
      const enc = await AudioEncoder.isConfigSupported(encoderConfig(bitrate));
      const dec = await AudioDecoder.isConfigSupported({ codec: 'opus', sampleRate: RATE, numberOfChannels: 1 });
      if (enc.supported && dec.supported) return null;
    } catch (e) { /* a config the browser cannot even parse: not supported */ }
    return "this browser's WebCodecs cannot code Opus.";
  }

  const encoderConfig = (bitrate) => ({ codec: 'opus', sampleRate: RATE, numberOfChannels: 1, bitrate,
                                        opus: { frameDuration: FRAME_US } });

  // ---- mic -> server ------------------------------------------------------------------------------------------
  // Captured samples (48 kHz) in, WebM messages out, one per packet as soon as it is coded: `send(bytes, needed)`,
  // `needed` being the capture count the encoder had to reach to code it (its frame's end: the look-ahead of
  // pre-skip samples included). `end(total)` codes the rest and trims the stream to the `total` samples captured
  // (DiscardPadding on the last block), so the server decodes exactly what was captured.
  class Uplink {
    constructor(bitrate, send, fail) {
      this.send = send;
      this.coded = 0;       // samples (48 kHz) the packets so far hold, the encoder's look-ahead included
      this.preSkip = 0;
      this.header = null;   // the WebM header, until it goes out with the first block
      this.cluster = null;  // ms
      this.held = null;     // packets coded while ending: the last one needs its DiscardPadding
      this.encoder = new AudioEncoder({ output: (chunk, meta) => this.onPacket(chunk, meta), error: (e) => fail(e) });
      this.encoder.configure(encoderConfig(bitrate));
    }

    push(samples, position) {
      this.encoder.encode(new AudioData({ format: 'f32', sampleRate: RATE, numberOfChannels: 1,
        numberOfFrames: samples.length, timestamp: Math.round(position * 1e6 / RATE), data: samples }));
    }

    onPacket(chunk, meta) {
      const packet = new Uint8Array(chunk.byteLength);
      chunk.copyTo(packet);
      if (this.coded === 0) {
        // Chromium hands over the OpusHead; without one, libopus's usual 6.5 ms look-ahead is announced.
        const d = meta && meta.decoderConfig && meta.decoderConfig.description;
        const head = !d ? DEFAULT_HEAD
          : new Uint8Array(ArrayBuffer.isView(d) ? d.buffer : d, d.byteOffset || 0, d.byteLength).slice();
        this.preSkip = head[10] | (head[11] << 8);
        this.header = webmHeader(head);
      }
      const start = this.coded;
      this.coded += packetSamples(packet);
      if (this.held) this.held.push({ packet, start });
      else this.send(this.block(packet, start, -1), this.coded);
    }

    block(packet, start, discard) {
      const parts = [];
      if (this.header) { parts.push(this.header); this.header = null; }
      const ms = Math.round(start * 1000 / RATE);
      if (this.cluster === null || ms - this.cluster >= CLUSTER_MS) {
        this.cluster = ms;
        parts.push(Uint8Array.from([...idBytes(ID.CLUSTER), ...UNKNOWN_SIZE]), uint(ID.TIMECODE, ms));
      }
      const tc = ms - this.cluster;
      const head = [0x81, (tc >> 8) & 0xFF, tc & 0xFF];
      if (discard < 0) parts.push(element(ID.SIMPLE_BLOCK, head, [0x80], packet));  // keyframe
      else {  // the last block: a BlockGroup, whose DiscardPadding (ns) trims the end
        parts.push(element(ID.BLOCK_GROUP, element(ID.BLOCK, head, [0], packet),
          int64(ID.DISCARD_PADDING, Math.round(discard * 1e9 / RATE))));
      }
      return concat(parts);
    }

    async end(total) {
      this.held = [];
      await this.encoder.flush();
      this.encoder.close();
      const end = this.preSkip + total;  // where the decoded stream must stop, pre-skip included
      const packets = this.held.filter((p) => p.start < end);  // none wholly past the end (the encoder pads)
      packets.forEach((p, k) => {
        const stop = p.start + packetSamples(p.packet);
        const discard = k === packets.length - 1 ? Math.max(0, stop - end) : -1;
        this.send(this.block(p.packet, p.start, discard), Math.min(total, stop));
      });
    }

    close() { if (this.encoder.state !== 'closed') this.encoder.close(); }
  }

  // ---- server -> speaker --------------------------------------------------------------------------------------
  // The server's WebM bytes in (output frames' payloads, in order); `push` returns the stream position (48 kHz,
  // after the pre-skip) of the first sample of the packets it completed, or null if none. Decoded audio comes to
  // `play(samples, start)`; the stream's end is trimmed as its last block's DiscardPadding says.
  class Downlink {
    constructor(play, fail) {
      this.reader = new WebMReader();
      this.play = play;
      this.fail = fail;
      this.coded = 0;         // samples (48 kHz) of the packets read, pre-skip included
      this.preSkip = 0;
      this.end = Infinity;    // stream position where the audio ends, once the last block is read
      this.position = 0;      // stream position of the next decoded sample
      this.decoder = null;
    }

    push(bytes) {
      let first = null;
      for (const { packet, discard } of this.reader.push(bytes)) {
        if (!this.decoder) {
          const head = this.reader.head;
          this.preSkip = head[10] | (head[11] << 8);
          this.decoder = new AudioDecoder({ output: (data) => this.onAudio(data), error: (e) => this.fail(e) });
          // The decoder drops the OpusHead's pre-skip itself.
          this.decoder.configure({ codec: 'opus', sampleRate: RATE, numberOfChannels: 1, description: head });
        }
        if (first === null) first = Math.max(0, this.coded - this.preSkip);
        const start = this.coded;
        this.coded += packetSamples(packet);
        if (discard > 0) this.end = this.coded - this.preSkip - discard;
        const timestamp = Math.round(start * 1e6 / RATE);
        this.decoder.decode(new EncodedAudioChunk({ type: 'key', timestamp, data: packet }));
      }
      return first;
    }

    onAudio(data) {
      const samples = new Float32Array(data.numberOfFrames);
      data.copyTo(samples, { planeIndex: 0, format: 'f32-planar' });
      data.close();
      const start = this.position;
      this.position += samples.length;  // before play(), which may transfer the buffer away
      const n = Math.max(0, Math.min(samples.length, this.end - start));
      if (n > 0) this.play(samples.subarray(0, n), start);
    }

    async flush() { if (this.decoder) await this.decoder.flush(); }

    close() { if (this.decoder && this.decoder.state !== 'closed') this.decoder.close(); }
  }

  return { RATE, FRAME_US, unsupported, Uplink, Downlink, packetSamples };
})();
