"""English speech synthesised with espeak-ng: training data that needs no download.

Each utterance draws a sentence, an English voice (``en``, ``en-us``, ``en-gb-x-rp``, ...; those this
espeak-ng lacks are left out), a voice variant (``+m1`` .. ``+m7``, ``+f1`` .. ``+f4`` or none), a speed
(``-s`` 130..200 words per minute) and a pitch (``-p`` 30..70), all from a seeded generator. espeak-ng
writes a 22.05 kHz wav (``-w``); it is resampled to the model's rate with soxr and cached in a work
directory under a name that hashes every choice, so a rerun reuses the files.

Training sentences are the ``TRAIN_SENTENCES`` list plus ``PHRASE_*`` combinations (thousands in all);
held-out utterances use ``EVAL_SENTENCES``, which appear nowhere in the training text.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import soxr

from .options import TrainingError

VOICES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
SPEED_RANGE = (130, 200)
PITCH_RANGE = (30, 70)

TRAIN_SENTENCES: Tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "When the sunlight strikes raindrops in the air, they act as a prism and form a rainbow.",
    "The north wind and the sun were disputing which was the stronger.",
    "A journey of a thousand miles begins with a single step.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "Peter Piper picked a peck of pickled peppers.",
    "The train to Edinburgh leaves from platform nine at a quarter past seven.",
    "Could you tell me the way to the nearest post office, please?",
    "I have never seen such a beautiful sunset over the harbour.",
    "The committee will meet again on Thursday, the fourteenth of March.",
    "Turn left at the second traffic light and keep going for two hundred metres.",
    "Our flight was delayed by three hours because of the fog.",
    "Do you prefer tea or coffee in the morning?",
    "The museum opens at nine and closes at half past five.",
    "He whispered the answer so quietly that nobody heard it.",
    "Thank you very much for your help yesterday.",
    "It is twenty three degrees and sunny in the afternoon.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Please remember to switch off the lights before you leave.",
    "My phone number is five five five, one two three, four five six seven.",
    "The library has more than forty thousand books on its shelves.",
    "Why did the chicken cross the road?",
    "Wow, that was absolutely amazing!",
    "Nobody expected the concert to sell out in under ten minutes.",
    "The children built a sandcastle with towers, walls and a deep moat.",
    "Heavy rain is expected across the north of the country tonight.",
    "Can you hear the difference between these two recordings?",
    "The software update fixed the bug that crashed the application.",
    "Every Monday she walks her dog along the river before work.",
    "The old lighthouse has guided ships safely home for a century.",
    "Please keep your seat belt fastened while the sign is illuminated.",
    "What time does the last bus to the airport leave?",
    "He bought a second hand bicycle for eighty pounds.",
    "The temperature dropped sharply after midnight.",
    "I would like a table for four at eight o'clock, please.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The orchestra tuned their instruments before the performance began.",
    "Don't forget to water the plants while I am away.",
    "The garden was full of roses, tulips and bright yellow daffodils.",
    "Mathematics is the language in which the universe is written.",
    "She finished the marathon in three hours and twelve minutes.",
    "Where did you put the keys to the garage?",
    "The baker starts work at four in the morning every day.",
    "Listen carefully, because I will only say this once.",
    "The bridge was closed for repairs during the summer.",
    "Is this the right platform for the train to Manchester?",
    "A gentle breeze carried the smell of freshly cut grass.",
    "The results of the experiment were surprisingly consistent.",
    "Could you speak a little more slowly, please?",
    "They painted the kitchen a pale shade of green.",
    "Our neighbours are having a party on Saturday night.",
    "The quick response of the firefighters saved the building.",
    "Yesterday I read an article about volcanoes in Iceland.",
    "The shop on the corner sells newspapers, sweets and stamps.",
    "Two plus two equals four, and three times three equals nine.",
    "Good morning, and welcome to the weekly news summary.",
)

PHRASE_SUBJECTS = (
    "My sister", "The old farmer", "A young engineer", "Our teacher", "The pilot", "Her grandfather",
    "The little boy", "A tired doctor", "The new manager", "Every student", "The shy musician", "His cousin",
    "The taxi driver", "A friendly neighbour", "The famous chef", "The night guard",
)
PHRASE_VERBS = (
    "carefully painted", "quickly repaired", "proudly showed us", "happily described", "slowly carried",
    "nervously opened", "quietly counted", "eagerly tasted", "suddenly dropped", "patiently explained",
    "secretly borrowed", "finally found",
)
PHRASE_OBJECTS = (
    "the broken window", "a heavy wooden box", "the map of the city", "a bowl of hot soup", "the silver key",
    "an old photograph", "the red umbrella", "a basket of apples", "the noisy engine", "a letter from Paris",
    "the kitchen clock", "a pile of homework",
)
PHRASE_TAILS = (
    "before breakfast.", "in the middle of the night.", "after the long meeting.", "on a cold winter morning.",
    "without saying a word.", "while it was raining outside.", "during the school holidays.",
    "just before the guests arrived.", "at the end of the street.", "for the second time this week.",
    "in front of the whole family.", "near the railway station.",
)

EVAL_SENTENCES: Tuple[str, ...] = (
    "Birch canoes slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
)


def train_sentences() -> List[str]:
    """Every training sentence: the fixed list, then the phrase combinations."""
    combos = (" ".join(parts) for parts in itertools.product(PHRASE_SUBJECTS, PHRASE_VERBS, PHRASE_OBJECTS,
                                                             PHRASE_TAILS))
    return list(TRAIN_SENTENCES) + list(combos)


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise TrainingError("espeak data needs the espeak-ng program on PATH (Debian/Ubuntu: apt-get install "
                            "espeak-ng); or train on a directory of audio files (--data DIR)")
    return path


def available_voices(binary: Optional[str] = None) -> List[str]:
    """The ``VOICES`` this espeak-ng has (``espeak-ng --voices=en``), in ``VOICES`` order; ``["en"]`` if none."""
    binary = binary or espeak_binary()
    try:
        listing = subprocess.run([binary, "--voices=en"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    names = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    voices = [v for v in VOICES if v in names]
    return voices or ["en"]


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: str
    variant: str
    speed: int
    pitch: int

    @property
    def voice_arg(self) -> str:
        return f"{self.voice}+{self.variant}" if self.variant else self.voice

    def filename(self, split: str, index: int, sample_rate: int) -> str:
        key = f"{self.text}|{self.voice_arg}|{self.speed}|{self.pitch}|{sample_rate}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return f"{split}_{index:05d}_{digest}.wav"


def plan_utterances(count: int, sentences: Sequence[str], voices: Sequence[str], seed: int) -> List[Utterance]:
    """``count`` utterances of random sentences, voices, variants, speeds and pitches (seeded)."""
    rng = np.random.default_rng([seed, 0xE5])
    return [
        Utterance(
            text=sentences[int(rng.integers(len(sentences)))],
            voice=voices[int(rng.integers(len(voices)))],
            variant=VARIANTS[int(rng.integers(len(VARIANTS)))],
            speed=int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
            pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
        )
        for _ in range(count)
    ]


def synthesize(utterance: Utterance, path: Path, sample_rate: int, binary: Optional[str] = None) -> Path:
    """Speak ``utterance`` with espeak-ng and write it to ``path`` as 16-bit mono at ``sample_rate``."""
    binary = binary or espeak_binary()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "espeak.wav"
        cmd = [binary, "-v", utterance.voice_arg, "-s", str(utterance.speed), "-p", str(utterance.pitch),
               "-w", str(raw), "--", utterance.text]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            raise TrainingError(f"espeak-ng failed to run: {exc}") from exc
        if result.returncode != 0 or not raw.is_file():
            raise TrainingError(f"espeak-ng failed ({' '.join(cmd[:-1])} ...): {result.stderr.strip()}")
        audio, rate = sf.read(str(raw), dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
        if rate != sample_rate:
            audio = soxr.resample(audio, rate, sample_rate, quality="HQ")
        staged = Path(tmp) / "out.wav"
        sf.write(str(staged), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16")
        os.replace(staged, path)
    return path


def generate(work_dir: str | Path, sample_rate: int, train_count: int, eval_count: int, seed: int = 0,
             workers: int = 4) -> Tuple[List[Path], List[Path]]:
    """Synthesise (or find cached in ``work_dir``) ``train_count`` training and ``eval_count`` held-out
    utterances at ``sample_rate``; returns their paths (train, eval)."""
    binary = espeak_binary()
    voices = available_voices(binary)
    work_dir = Path(work_dir)
    jobs = []
    for split, count, sentences in (("train", train_count, train_sentences()), ("eval", eval_count, EVAL_SENTENCES)):
        for i, utt in enumerate(plan_utterances(count, sentences, voices, seed + (split == "eval"))):
            jobs.append((split, utt, work_dir / split / utt.filename(split, i, sample_rate)))
    todo = [(utt, path) for _, utt, path in jobs if not path.is_file()]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            list(pool.map(lambda job: synthesize(job[0], job[1], sample_rate, binary), todo))
    return ([p for s, _, p in jobs if s == "train"], [p for s, _, p in jobs if s == "eval"])
