"""Hard negative captions for CLIP: the caption with one attribute made false.

    contrast_caption("a red circle above a blue square", groups, rng)
    -> "a green circle above a blue square"   (a word replaced by another of its group)
    -> "a blue circle above a red square"     (two words of a group swapped: the binding)
    -> "a red circle below a blue square"

`groups` are sets of interchangeable words (colours, shapes, relations); an edit either
replaces one word with another of its group or swaps two different words of one group. The
group is drawn first, uniformly among those the caption can be edited in, then the kind of
edit (each as likely as the other when both are possible), then the edit: drawn uniformly
over all edits, "a red circle above a blue square" would get a colour edit 10 times as often
as "below", and CLIP would learn little about relations. A swap that leaves the caption's
phrases (maximal runs of group words, e.g. "red circle", "top left") the same multiset is not
made: "a red circle and a red square" -> "a red square and a red circle" says the same thing.
Nor is a word with the same group words before and after it replaced: "a red circle above a
red circle" -> "... below ..." is as true. In-batch negatives of a contrastive loss rarely
differ from the caption in one attribute only, so CLIP can score "a red circle above a blue
square" high for an image of a blue circle above a red square; a caption that differs in
exactly that way, scored against the image, teaches it the difference.
"""
from __future__ import annotations

import numpy as np


def word_group_index(groups) -> dict[str, int]:
    """word -> the index of its group; a word in two groups is an error."""
    index = {}
    for g, words in enumerate(groups):
        for word in words:
            if word in index and index[word] != g:
                raise ValueError(f"contrast word {word!r} is in two groups")
            index[word] = g
    return index


def phrases(words: list[str], group_of: dict[str, int]) -> list[str]:
    """The sorted maximal runs of consecutive group words."""
    found, current = [], []
    for word in words + [""]:
        if word in group_of:
            current.append(word)
        elif current:
            found.append(" ".join(current))
            current = []
    return sorted(found)


def _mirror_positions(words: list[str], group_of: dict[str, int]) -> set[int]:
    """Positions with the same group words before as after them ("a red circle above a red
    circle"): replacing such a word names the same scene from the other side."""
    named = [(i, w) for i, w in enumerate(words) if w in group_of]
    # k > 0: a lone group word has nothing on either side to mirror ("a red circle" with
    # colours the only group).
    return {i for k, (i, _) in enumerate(named)
            if k > 0 and [w for _, w in named[:k]] == [w for _, w in named[k + 1:]]}


def _swapped(words: list[str], i: int, j: int) -> list[str]:
    words = list(words)
    words[i], words[j] = words[j], words[i]
    return words


def _group_edits(words: list[str], g: int, groups, group_of: dict[str, int]):
    """(replacements, swaps) of group `g`'s words in `words` that change the caption's meaning."""
    slots = [i for i, w in enumerate(words) if group_of.get(w) == g]
    fixed = _mirror_positions(words, group_of)
    replaced = [words[:i] + [other] + words[i + 1:]
                for i in slots if i not in fixed for other in groups[g] if other != words[i]]
    original = phrases(words, group_of)
    swapped = [_swapped(words, i, j) for a, i in enumerate(slots) for j in slots[a + 1:]
               if words[i] != words[j]]
    return replaced, [edit for edit in swapped if phrases(edit, group_of) != original]


def contrast_caption(caption: str, groups, rng: np.random.Generator,
                     excluded: tuple[str, ...] = ()) -> str | None:
    """`caption` with one edit that makes it false (see the module doc), or None when it has
    no word of any group. No result contains an `excluded` phrase (e.g. the colour-shape
    pairs held out of training, which must not reach the model even as negatives)."""
    group_of = word_group_index(groups)
    words = caption.split()
    padded = [f" {phrase} " for phrase in excluded]

    def allowed(edits):
        texts = (" ".join(edit) for edit in edits)
        return [t for t in texts if not any(p in f" {t} " for p in padded)]

    choices = []  # per editable group, its non-empty kinds of edit
    for g in sorted({group_of[w] for w in words if w in group_of}):
        kinds = [kind for kind in map(allowed, _group_edits(words, g, groups, group_of)) if kind]
        if kinds:
            choices.append(kinds)
    if not choices:
        return None
    kinds = choices[int(rng.integers(len(choices)))]
    edits = kinds[int(rng.integers(len(kinds)))]
    return edits[int(rng.integers(len(edits)))]
