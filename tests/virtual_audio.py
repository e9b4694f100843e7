"""A private PulseAudio server with a virtual microphone and a virtual speaker, for machines with no sound card.

Two null sinks, both float32 mono at one sample rate (so PulseAudio never converts or resamples):

* ``snac_mic``: whatever is played into it (``paplay --device=snac_mic``) comes out of its monitor, which
  PortAudio sees as the input device ``virtual_mic``;
* ``snac_speaker``: PortAudio's output device ``virtual_speaker`` plays into it; its monitor
  (``snac_speaker.monitor``) is what a test records with ``parecord``.

The ALSA devices are ``type pulse`` PCMs declared in a private ALSA config (``ALSA_CONFIG_PATH``), so
sounddevice lists them by name. Nothing global is touched: the server, its socket and its state live in one
directory, and :meth:`VirtualAudio.env` gives the environment a client process needs.

Used by ``tests/test_live_demos.py``; also runnable by hand to try the live demo without audio hardware::

    python tests/virtual_audio.py /tmp/vaudio      # starts the server, prints the environment to export
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

MIC_SINK = "snac_mic"
SPEAKER_SINK = "snac_speaker"
MIC_DEVICE = "virtual_mic"  # PortAudio (ALSA) name of MIC_SINK's monitor
SPEAKER_DEVICE = "virtual_speaker"  # PortAudio (ALSA) name of SPEAKER_SINK
REQUIRED_TOOLS = ("pulseaudio", "pactl", "paplay", "parecord", "pacat")
SYSTEM_ALSA_CONF = "/usr/share/alsa/alsa.conf"

_ASOUNDRC = """\
pcm.{mic} {{
    type pulse
    device "{mic_sink}.monitor"
    hint {{ show on description "snac-stream virtual microphone ({mic_sink}.monitor)" }}
}}
pcm.{speaker} {{
    type pulse
    device "{speaker_sink}"
    hint {{ show on description "snac-stream virtual speaker ({speaker_sink})" }}
}}
"""


def missing_tools() -> List[str]:
    """Programs and libraries the virtual devices need that are not installed (empty when all are there)."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not Path(SYSTEM_ALSA_CONF).exists():
        missing.append(f"ALSA config {SYSTEM_ALSA_CONF} (libasound2-data)")
    try:
        import sounddevice  # noqa: F401  (needs the PortAudio shared library)
    except (ImportError, OSError) as exc:
        missing.append(f"sounddevice/PortAudio ({exc})")
    return missing


class VirtualAudio:
    """A private PulseAudio daemon with the two null sinks, rooted at ``directory``.

    Args:
        directory: where the daemon keeps its socket, state and the ALSA config (created if needed).
        rate: sample rate of both sinks in Hz.
    """

    def __init__(self, directory: Path, rate: int = 24000) -> None:
        self.directory = Path(directory)
        self.rate = rate
        self.runtime = self.directory / "pulse"
        self.alsa_conf = self.directory / "asoundrc"
        self.socket = self.runtime / "native"

    def env(self) -> Dict[str, str]:
        """Environment variables that point PulseAudio and ALSA clients at this server."""
        return {
            "PULSE_SERVER": f"unix:{self.socket}",
            "PULSE_RUNTIME_PATH": str(self.runtime),
            # Anonymous auth is on, so no cookie is needed; pointing at a private one keeps ~ untouched.
            "PULSE_COOKIE": str(self.directory / "cookie"),
            "ALSA_CONFIG_PATH": f"{SYSTEM_ALSA_CONF}:{self.alsa_conf}",
        }

    def client_env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """``base`` (default ``os.environ``) with :meth:`env` applied."""
        return {**(os.environ if base is None else base), **self.env()}

    def start(self, timeout: float = 20.0) -> "VirtualAudio":
        """Start the daemon and wait until both sinks exist; raises RuntimeError with its log otherwise."""
        self.runtime.mkdir(parents=True, exist_ok=True)
        self.alsa_conf.write_text(_ASOUNDRC.format(mic=MIC_DEVICE, mic_sink=MIC_SINK, speaker=SPEAKER_DEVICE,
                                                   speaker_sink=SPEAKER_SINK))
        sink = "module-null-sink sink_name={} format=float32le rate={} channels=1"
        log = self.directory / "pulseaudio.log"
        # -n: no default.pa (no hardware probing); root is fine without --system when HOME is private.
        # --disallow-exit/--exit-idle-time=-1: the server must outlive idle periods between test steps.
        cmd = ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
               "--disable-shm=yes", "--log-target=stderr", "--log-level=notice",
               "-L", f"module-native-protocol-unix socket={self.socket} auth-anonymous=1",
               "-L", sink.format(MIC_SINK, self.rate), "-L", sink.format(SPEAKER_SINK, self.rate)]
        env = {**self.client_env(), "HOME": str(self.directory), "XDG_CONFIG_HOME": str(self.directory / "config")}
        self._log = open(log, "wb")
        self.process = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:  # poll for the sinks to appear (the daemon has no readiness signal we can wait on)
            if self.process.poll() is not None:
                raise RuntimeError(f"pulseaudio exited with status {self.process.returncode}: {log.read_text()}")
            probe = subprocess.run(["pactl", "list", "short", "sinks"], env=self.client_env(),
                                   capture_output=True, text=True, timeout=10)
            if probe.returncode == 0 and MIC_SINK in probe.stdout and SPEAKER_SINK in probe.stdout:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pulseaudio did not come up in {timeout} s: {probe.stderr} {log.read_text()}")
            time.sleep(0.1)

    def play(self, wav: Path, sink: str = MIC_SINK, timeout: float = 60.0) -> None:
        """Play a wav file into ``sink`` and return when it has been played."""
        subprocess.run(["paplay", f"--device={sink}", str(wav)], env=self.client_env(), check=True,
                       capture_output=True, timeout=timeout)

    def feed(self, sink: str = MIC_SINK) -> "SinkFeed":
        """A continuous stream into ``sink`` that plays silence until :meth:`SinkFeed.say` adds audio."""
        return SinkFeed(self, sink)

    def record(self, out: Path, source: str = SPEAKER_SINK + ".monitor") -> subprocess.Popen:
        """Start recording ``source`` as raw float32 mono samples at ``rate`` into ``out``; stop with :meth:`stop_recording`."""
        return subprocess.Popen(
            ["parecord", f"--device={source}", "--raw", "--format=float32le", f"--rate={self.rate}",
             "--channels=1", "--latency-msec=20", str(out)],
            env=self.client_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @staticmethod
    def stop_recording(recorder: subprocess.Popen, timeout: float = 10.0) -> None:
        VirtualAudio.stop_recordings(recorder, timeout=timeout)

    @staticmethod
    def stop_recordings(*recorders: subprocess.Popen, timeout: float = 10.0) -> None:
        """Stop several recorders at one instant (SIGINT to all, then wait for each): recordings started at
        different moments end together, so positions counted from their ends share one clock."""
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)  # parecord finishes writing its buffer on SIGINT
        for recorder in recorders:
            try:
                recorder.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()

    def stop(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> "VirtualAudio":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SinkFeed:
    """One long-lived ``pacat`` stream into a sink, kept busy with silence.

    A null sink's monitor loses the first few hundred milliseconds that a *new* stream plays into the sink
    (observed with PulseAudio 16: the sink rewinds to mix the newcomer in, and its monitor has already passed
    that audio on as silence). Playing the clip inside a stream that is already running avoids that: the
    writer thread sends silence block by block (pacat's back-pressure paces it) and splices the clip in.
    """

    def __init__(self, audio: VirtualAudio, sink: str, block: int = 480) -> None:
        import numpy as np

        self._np = np
        self.block = block
        self.process = subprocess.Popen(
            ["pacat", "--playback", f"--device={sink}", "--raw", "--format=float32le", f"--rate={audio.rate}",
             "--channels=1", "--latency-msec=40"],
            env=audio.client_env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._pending: "queue.Queue" = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        silence = self._np.zeros(self.block, self._np.float32).tobytes()
        try:
            while not self._stop.is_set():
                try:
                    chunk = self._pending.get_nowait()
                except queue.Empty:
                    chunk = None
                self.process.stdin.write(silence if chunk is None else chunk.data)
                if chunk is not None:
                    chunk.written.set()
        except (BrokenPipeError, ValueError):
            pass

    def say(self, samples) -> None:
        """Queue float32 mono samples to play next; returns once they are handed to pacat."""
        item = type("Chunk", (), {})()
        item.data = self._np.asarray(samples, self._np.float32).tobytes()
        item.written = threading.Event()
        self._pending.put(item)
        if not item.written.wait(timeout=60):
            raise RuntimeError("pacat did not accept the audio within 60 s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        self.process.terminate()
        self.process.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/virtual_audio.py DIRECTORY")
    missing = missing_tools()
    if missing:
        sys.exit("missing: " + ", ".join(missing))
    audio = VirtualAudio(Path(sys.argv[1]).resolve()).start()
    print(f"# pulseaudio running (pid {audio.process.pid}); in your shell:")
    for key, value in audio.env().items():
        print(f"export {key}='{value}'")
    print(f"# then: snac-stream live --input-device {MIC_DEVICE} --output-device {SPEAKER_DEVICE}")
    print(f"#       paplay --device={MIC_SINK} speech.wav     (talk into the virtual microphone)")
    print(f"#       kill {audio.process.pid}                  (stop the server)")
    # Leave the daemon running when this script exits.
    audio.process = None
