"""Small tokenizers built in code, so tiny presets never touch the Hugging Face hub.

The real checkpoints ship their tokenizers as files on the hub, and the diffusers and transformers test suites
still download them. Here each tokenizer's vocabulary is learned in a fraction of a second from a fixed built-in
corpus (industrial-part captions, colours, materials, numbers, common English words) and handed to the
transformers class the real model uses, with the same special tokens and text pipeline. The byte-level BPE
tokenizers (CLIP, OPT) carry the full byte alphabet, so any text tokenizes without unknown tokens.

The merges are learned by a few lines of Python rather than the `tokenizers` trainers: those break ties between
equally frequent pairs in hash order, so two builds in one process gave different vocabularies, and a tiny
preset's token ids must not change between runs.

Learning is cached; each call wraps the cached vocabulary in a new tokenizer object, because processors mutate
their tokenizer (BLIP-2's adds an ``<image>`` token) and one caller must not change another's. (A deepcopy would
not do: it drops the decode hook CLIPTokenizer installs on its backend.)
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable

from tokenizers import normalizers, pre_tokenizers
from transformers import BertTokenizer, CLIPTokenizer, GPT2Tokenizer

_CAPTIONS = (
    "a brass ball valve with a lever handle and four bolts on a round flange",
    "a stainless steel hex nut next to a zinc plated washer on a white table",
    "a red cast iron gear with twenty four teeth and a keyway",
    "a black rubber o-ring lying beside a blue plastic pipe fitting",
    "an aluminium bracket with two holes and a countersunk screw",
    "a copper elbow joint soldered to a straight copper pipe",
    "a green circuit board with a yellow connector and three resistors",
    "a grey concrete block with a crack along the left side",
    "a silver spring coiled around a steel rod in a workshop",
    "a close up photo of a worn bearing with rust on the outer ring",
    "an orange safety helmet hanging on a hook near a wooden door",
    "a chrome faucet dripping water into a ceramic sink",
    "a photo of a cat sitting on a chair next to a window",
    "a dog running on the grass in a park on a sunny day",
    "a man holding a wrench while repairing a bicycle wheel",
    "two people standing in front of a large machine in a factory",
    "a car parked on the street beside a tall building at night",
    "a bowl of fruit with apples, bananas and oranges on the kitchen counter",
    "the quick brown fox jumps over the lazy dog",
    "there is a small hole in the middle of the metal plate",
    "this image shows a valve, a pump and a pressure gauge",
    "a picture of an object with a smooth surface and sharp edges",
    "a threaded bolt, a flat washer, a spring washer and a nut",
    "a flange with 4 bolts, 8 bolts or 12 bolts",
    "a pipe of 10 mm, 25 mm, 50 mm and 100 mm diameter",
)
_WORDS = (
    "red orange yellow green blue purple pink brown black white grey gray silver gold golden bronze "
    "brass copper steel stainless iron aluminium aluminum zinc titanium plastic rubber nylon wood wooden glass "
    "ceramic concrete paper leather fabric metal metallic painted plated polished rusty rusted dirty clean "
    "valve pump gauge flange bolt nut screw washer gear shaft bearing spring pipe tube hose fitting elbow tee "
    "coupling bracket plate sheet rod bar beam block housing cover cap lid handle lever knob wheel pulley belt "
    "chain hinge latch lock key clamp clip pin rivet nail hook ring seal gasket filter motor engine sensor wire "
    "cable connector switch button board chip resistor capacitor lamp light bulb box crate pallet tool hammer "
    "wrench spanner drill saw knife blade scissors ruler tape "
    "zero one two three four five six seven eight nine ten eleven twelve twenty thirty hundred thousand "
    "0 1 2 3 4 5 6 7 8 9 10 12 16 20 24 32 50 64 100 "
    "a an the this that these those is are was were be been has have had with without of on in at to from by "
    "for and or but not no yes it its there here what which who where when how why all some many few more most "
    "other another each every both either small large big tiny huge long short tall wide narrow thick thin "
    "round square flat curved straight left right top bottom front back side middle inside outside near far "
    "new old broken damaged cracked bent worn missing open closed empty full hot cold wet dry "
    "photo photograph image picture view close up shot background foreground object scene "
    "person man woman child people dog cat bird car truck bus bicycle tree grass sky water road street "
    "house building room table chair door window floor wall kitchen factory workshop warehouse "
    "holding standing sitting lying hanging running walking looking showing made shows"
)


def _corpus() -> list[str]:
    """The fixed training text: deterministic, so every build yields the same vocabulary."""
    return [*_CAPTIONS, *_WORDS.split(" "), _WORDS]


def _learn_merges(
    words: list[list[str]], max_merges: int, join: Callable[[str, str], str] = str.__add__
) -> list[tuple[str, str]]:
    """Byte-pair encoding (Sennrich et al. 2016): repeatedly merge the most frequent adjacent symbol pair.

    Ties go to the alphabetically first pair, so the result depends only on ``words``. Stops when no pair
    occurs twice; the corpus is small, so this happens after a few hundred merges.
    """
    counts = Counter(tuple(word) for word in words)
    pairs: Counter[tuple[str, str]] = Counter()
    for symbols, count in counts.items():
        for pair in itertools.pairwise(symbols):
            pairs[pair] += count
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        top = max(pairs.values(), default=0)
        if top < 2:
            break
        best = min(pair for pair, count in pairs.items() if count == top)
        merges.append(best)
        for symbols in [word for word in counts if best[0] in word and best[1] in word]:
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(join(*best))
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            if len(out) == len(symbols):  # both symbols occur, but not side by side
                continue
            count = counts.pop(symbols)
            counts[tuple(out)] += count
            for pair in itertools.pairwise(symbols):
                pairs[pair] -= count
            for pair in itertools.pairwise(out):
                pairs[pair] += count
    return merges


def _words(
    text_pipeline: normalizers.Normalizer | None, pre_tokenizer: pre_tokenizers.PreTokenizer
) -> list[str]:
    """The corpus split into words exactly as the target tokenizer will split text."""
    words = []
    for text in _corpus():
        if text_pipeline is not None:
            text = text_pipeline.normalize_str(text)
        words += [word for word, _ in pre_tokenizer.pre_tokenize_str(text)]
    return words


def _byte_alphabet() -> list[str]:
    """The 256 symbols byte-level BPE maps bytes to, in a fixed order (the library returns a set)."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _index(tokens: list[str]) -> dict[str, int]:
    """Token -> id in first-seen order, skipping repeats (a merge can rebuild an existing token)."""
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


@functools.cache
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Split with CLIP's own normaliser and pre-tokeniser; like CLIP, the last symbol of a word ends in "</w>".
    pipeline = CLIPTokenizer().backend_tokenizer
    words = [[*word[:-1], word[-1] + "</w>"] for word in _words(pipeline.normalizer, pipeline.pre_tokenizer)]
    merges = _learn_merges(words, max_merges=1000)
    # Laid out like OpenAI's vocabulary: bytes, bytes ending a word, merges, and the two special tokens last.
    tokens = _byte_alphabet() + [b + "</w>" for b in _byte_alphabet()] + ["".join(pair) for pair in merges]
    return _index([*tokens, "<|startoftext|>", "<|endoftext|>"]), merges


def local_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer with CLIP's conventions, for CLIP, OWLv2 and Stable Diffusion tiny presets.

    Keeps ``<|startoftext|>``/``<|endoftext|>`` as BOS/EOS (CLIP's text tower pools at the EOS position) and
    ``model_max_length`` (77 for CLIP/SD, 16 for OWLv2) so ``truncation=True`` cuts where the real one does.
    Stable Diffusion 2 and OWLv2 pad with ``"!"``; OpenAI's CLIP pads with ``<|endoftext|>``.
    """
    vocab, merges = _clip_vocab()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the local CLIP vocabulary")
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
    )


@functools.cache
def _opt_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = [list(word) for word in _words(None, pre_tokenizers.ByteLevel(add_prefix_space=False))]
    merges = _learn_merges(words, max_merges=1000)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3
    return _index(specials + _byte_alphabet() + ["".join(pair) for pair in merges]), merges


def local_opt_tokenizer() -> GPT2Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer with OPT's special tokens, for the BLIP-2 tiny preset.

    As in facebook/opt-*, ``</s>`` is BOS, EOS and UNK at once and is prepended to every prompt.
    """
    vocab, merges = _opt_vocab()
    return GPT2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=2048,
    )


@functools.cache
def _bert_vocab() -> dict[str, int]:
    # WordPiece vocabularies are BPE merges where a word-internal piece carries a "##" prefix.
    words = _words(normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer())
    pieces = [[word[0], *("##" + char for char in word[1:])] for word in words]
    merges = _learn_merges(pieces, max_merges=1000, join=_join_wordpieces)
    # Printable ASCII as single pieces and continuations, so any ASCII word splits into known pieces, not [UNK].
    alphabet = [chr(c) for c in range(33, 127)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    merged = [_join_wordpieces(*pair) for pair in merges]
    return _index(specials + alphabet + ["##" + char for char in alphabet] + merged)


def _join_wordpieces(left: str, right: str) -> str:
    """``"val" + "##ve" -> "valve"``: the merged piece keeps the left piece's word-start or "##" marker."""
    return left + right.removeprefix("##")


def local_bert_tokenizer(model_max_length: int = 512) -> BertTokenizer:
    """An uncased WordPiece tokenizer with BERT's special tokens, for BLIP and Grounding DINO tiny presets."""
    return BertTokenizer(vocab=dict(_bert_vocab()), do_lower_case=True, model_max_length=model_max_length)
