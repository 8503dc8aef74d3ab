"""Training-data augmentation: word replacement with WordNet synonyms, random insertion,
swap and deletion (the EDA operations), and sentence-order perturbation.

Operations work on word lists with some positions protected, which is how tasks keep
labels intact: tagging protects entity words (and never inserts inside an entity),
QA protects the answer span. Applied on the fly, a fresh draw each epoch, seeded by
(seed, epoch) so every rank augments identically.

WordNet is read by nltk from Debian's `wordnet-base` files (/usr/share/wordnet, or
SHARDTUNE_WORDNET); no download.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
from pathlib import Path

from shardtune.errors import RecipeError

WORDNET_DIR = "/usr/share/wordnet"
# WordNet 3.0's lexicographer file names (lexnames(5WN)); Debian's wordnet-base lacks the
# lexnames file that nltk's reader requires, and these numbers are fixed by the format.
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
            "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
            "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
            "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
            "adj.ppl").split()
_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def wordnet_dir() -> Path:
    return Path(os.environ.get("SHARDTUNE_WORDNET", WORDNET_DIR))


def wordnet_missing() -> str | None:
    """None when WordNet can be read, else what to do about it."""
    if (wordnet_dir() / "data.noun").is_file():
        return None
    return (f"synonym replacement needs the WordNet database: no {wordnet_dir()}/data.noun; install it "
            "(apt-get install wordnet-base) or point SHARDTUNE_WORDNET at a WordNet 3.0 dict folder, "
            "or set data.augment.synonym_replace: 0")


@functools.lru_cache(maxsize=1)
def _wordnet():
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    problem = wordnet_missing()
    if problem:
        raise RecipeError(problem)
    # nltk wants the dict files plus a lexnames file in one folder it may read; it resolves
    # symlinks and refuses targets outside that folder, so the files are copied (~35 MB, once).
    folder = Path(os.environ.get("SHARDTUNE_CACHE", "~/.cache/shardtune")).expanduser() / "wordnet"
    if not (folder / "lexnames").is_file():
        building = folder.with_name(f"wordnet.building-{os.getpid()}")
        building.mkdir(parents=True, exist_ok=True)
        for source in wordnet_dir().iterdir():
            if source.is_file():
                shutil.copy2(source, building / source.name)
        (building / "lexnames").write_text("".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n"
                                                   for i, name in enumerate(LEXNAMES)))
        try:
            building.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(building, ignore_errors=True)
    nltk.data.path.append(str(folder))

    class DebianWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # nltk maps any WordNet it did not download itself onto its downloadable
            # "wordnet" corpus; Debian's files are that same WordNet 3.0, so no mapping.
            return None

    return DebianWordNet(str(folder), None)


@functools.lru_cache(maxsize=50_000)
def synonyms(word: str) -> tuple[str, ...]:
    """Single-word WordNet synonyms of `word` (lower case), without the word itself."""
    found = {lemma.name().lower() for synset in _wordnet().synsets(word.lower()) for lemma in synset.lemmas()}
    return tuple(sorted(w for w in found if w != word.lower() and "_" not in w and w.isalpha()))


class Augmenter:
    def __init__(self, options, seed: int):
        self.options = options
        self.rng = random.Random(seed)

    def should_augment(self) -> bool:
        return self.rng.random() < self.options.probability

    def words(self, words: list[str], protected: set[int] = frozenset(),
              no_insert_before: set[int] = frozenset()) -> tuple[list[str], list[int | None]]:
        """Augmented words, and for each output word the index of its source word (None: inserted).

        Protected positions are never replaced, swapped or deleted; nothing is inserted
        right before an index in no_insert_before (e.g. inside an entity)."""
        opt, rng = self.options, self.rng
        items: list[tuple[str, int | None]] = [(w, i) for i, w in enumerate(words)]
        free = lambda: [k for k, (_, src) in enumerate(items) if src is not None and src not in protected]
        n = len(words)
        if opt.synonym_replace:
            for k in free():
                if rng.random() < opt.synonym_replace and (choices := synonyms(items[k][0])):
                    items[k] = (_match_case(items[k][0], rng.choice(choices)), items[k][1])
        for _ in range(_count(opt.random_insert, n, rng)):
            sources = free()
            if not sources:
                break
            word = items[rng.choice(sources)][0]
            choices = synonyms(word) if opt.synonym_replace else ()
            spots = [k for k in range(len(items) + 1)
                     if k == len(items) or items[k][1] is None or items[k][1] not in no_insert_before]
            items.insert(rng.choice(spots), (rng.choice(choices) if choices else word, None))
        for _ in range(_count(opt.random_swap, n, rng)):
            sources = free()
            if len(sources) >= 2:
                a, b = rng.sample(sources, 2)
                items[a], items[b] = items[b], items[a]
        if opt.random_delete:
            kept = [(w, s) for w, s in items
                    if s is None or s in protected or rng.random() >= opt.random_delete]
            items = kept if kept else items[:1]
        return [w for w, _ in items], [s for _, s in items]

    def text(self, text: str) -> str:
        """Sentence perturbation, then word operations, on plain text."""
        if self.options.sentence_shuffle and self.rng.random() < self.options.sentence_shuffle:
            sentences = re.split(r"(?<=[.!?])\s+", text.strip())
            if len(sentences) > 1:
                self.rng.shuffle(sentences)
                text = " ".join(sentences)
        words, _ = self.words(text.split())
        return " ".join(words)


def _count(rate: float, n: int, rng: random.Random) -> int:
    """EDA's n_changes = rate x length, at least one when the rate is set."""
    return max(1, round(rate * n)) if rate else 0


def _match_case(original: str, replacement: str) -> str:
    return replacement.capitalize() if original[:1].isupper() else replacement
