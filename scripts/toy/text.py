"""Sentence templates of the toy corpus and the closed lexicon they span.

Templates use the fields ``char`` (name), ``verb``/``verbs``/``ing`` (action forms), ``loc``
and ``obj``.  Which fields a template uses decides which
modality answers it: char/loc/action come from frames, obj only from subtitles.  Every word any
template can produce is listed by :func:`lexicon`, which the toy tokenizer is trained on.
"""
from __future__ import annotations

import re
import string

from scripts.toy.world import ACTIONS, CHARACTERS, LOCATIONS, OBJECTS, Scene

# subtitles (speaker prefix added by the caller) and ASR lines
FACT_LINES = ("Where is my {obj}?", "I just found the {obj}.", "Have you seen my {obj}?",
              "This {obj} is not mine.", "I need the {obj} right now.")
# what the speaker does or where it is (see videos.dialogue): action lines, place lines
MENTION_LINES = (("I could keep {ing} all day.", "I love {ing}.", "Time for some {ing}."),
                 ("This {loc} is so quiet.", "I like this {loc}.", "Nobody else is in the {loc}."))
# an off-screen character answers the on-screen one ({char}) by name
REPLIES = ("Really, {char}? Tell me more.", "{char}, I have to go now.",
           "That sounds great, {char}.", "Okay {char}, see you later.", "No way, {char}!")
ASR_LINES = ("where is my {obj}", "i just found the {obj}", "look at this {obj}",
             "i need the {obj} now")
# TVR queries by type
TVR = {"v": "{char} is {ing} in the {loc}.",
       "t": "{char} talks about the {obj}.",
       "vt": "{char} is {ing} in the {loc} and talks about the {obj}."}
# TVQA: question, answer template, the scene field the answer varies. Only "who": the link
# between a name and a face is what the subtitles teach (docs/toy_qa.md measures the where and
# what questions this list held before: pre-training did not help HERO's QA head on them)
TVQA = (("Who is {ing} in the {loc}?", "{char}.", "char"),)
# words of the dropped where/what questions: kept in the lexicon so that the toy tokenizer, and
# with it the subtitles' token ids and every pre-trained checkpoint, stay the same
FORMER_TVQA = ("Where is {char} when talking about the {obj}?", "In the {loc}.",
               "What is {char} doing while talking about the {obj}?", "{char} is {ing}.")
TVC = ("{char} is {ing} in the {loc} and mentions the {obj}.",
       "In the {loc}, {char} talks about the {obj} while {ing}.")
VIOLIN = ("{char} is {ing} in the {loc} and talks about the {obj}.",
          "While {ing} in the {loc}, {char} asks about the {obj}.")
DIDEMO = ("{char} {verbs} in the {loc}.", "{char} starts {ing} in the {loc}")
MSRVTT = ("{char} is {ing} in the {loc}", "a person is {ing} in the {loc}",
          "{char} talks about a {obj} in the {loc}", "someone in the {loc} mentions a {obj}")

ALL_TEMPLATES = (FACT_LINES + sum(MENTION_LINES, ()) + REPLIES + ASR_LINES + tuple(TVR.values())
                 + tuple(t for q, a, _ in TVQA for t in (q, a)) + TVC + VIOLIN + DIDEMO + MSRVTT
                 + ("{char} : ",) + FORMER_TVQA)
# Why names are never lower-cased and answers never capitalise a word: a byte-level BPE gives
# "Alice", " Alice" and "alice" three unrelated ids, so a query word must appear in the same
# form in some subtitle for pre-training on subtitles to teach it. Sentence-initial names
# ("Alice is ...") are taught by the speaker prefix ("Alice : ..."), mid-sentence ones by the
# replies ("Really, Alice?").
FIELDS = ("char", "action", "loc", "obj")


def fill(template: str, char: int, action: int, loc: int, obj: int) -> str:
    verb, verbs, ing = ACTIONS[action]
    return template.format(char=CHARACTERS[char], verb=verb, verbs=verbs, ing=ing,
                           loc=LOCATIONS[loc], obj=OBJECTS[obj])


def describe(template: str, scene: Scene, **override) -> str:
    """Fill a template from a scene; ``override`` replaces fields (VIOLIN negatives)."""
    facts = {f: getattr(scene, f) for f in FIELDS}
    facts.update(override)
    return fill(template, **facts)


def lexicon() -> list[str]:
    """Every word and punctuation mark the templates can produce, sorted."""
    words = set()
    for template in ALL_TEMPLATES:
        for literal, *_ in string.Formatter().parse(template):
            words.update(re.findall(r"[A-Za-z]+|[^\sA-Za-z]", literal))
    words.update(CHARACTERS)
    # lower-case names and capitalised gerunds: no template produces them any more (see the
    # note on token forms above); they stay in the lexicon so that the toy tokenizer, and with
    # it the measured demo and study (docs/toy_study.md), stays the same
    words.update(c.lower() for c in CHARACTERS)
    words.update(w for forms in ACTIONS for w in forms)
    words.update(a[2].capitalize() for a in ACTIONS)
    words.update(LOCATIONS + OBJECTS)
    return sorted(words)
