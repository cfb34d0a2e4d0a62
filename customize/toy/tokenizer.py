"""The toy model's tokenizer: a byte-level BPE learned with the `tokenizers` library from the world's captions,
written in CLIP's format (vocab.json + merges.txt, "</w>" end-of-word suffix, <|startoftext|> / <|endoftext|>)
so that it loads as a `transformers.CLIPTokenizer` and sits in a StableDiffusionPipeline like CLIP's own.

The vocabulary holds, as single tokens, every word of the base captions plus the words the customization methods
need to exist without being taught: the rare identifiers ("sks", "zwx") and the words of the usual DreamBooth /
textual-inversion / style templates ("photo", "style", "painting", ...). The names of the held-out subject and
style are deliberately left out of the corpus: they tokenize into pieces, and no base caption ever uses them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from customize.toy import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 24  # tokens with <|startoftext|> and <|endoftext|>: the longest caption is 17, short sequences are cheap
# Whole-word tokens the methods rely on; never in a base caption, so their embeddings stay as initialised.
PLACEHOLDER_FRIENDLY_WORDS = (
    world.SUBJECT.identifier, world.STYLE.identifier,
    "photo", "picture", "rendering", "painting", "image", "drawing", "style", "object", "toy", "thing",
    "of", "in", "with", "the", "my", "one", "same", "by", "and",
)


def _byte_alphabet() -> list[str]:
    """CLIP's 256 printable stand-ins for bytes (the GPT-2 byte -> unicode table), in CLIP's vocabulary order."""
    from customize.models import _bytes_to_unicode

    return list(_bytes_to_unicode().values())


def learn_merges(corpus: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges learned from `corpus` until every word is one token (tokenizers' BpeTrainer with no vocabulary
    cap), in the order learned: the merge ranks CLIP's BPE applies."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def build_toy_tokenizer(captions: Iterable[str], extra_words: Iterable[str] = PLACEHOLDER_FRIENDLY_WORDS,
                        model_max_length: int = MODEL_MAX_LENGTH):
    """A CLIPTokenizer whose vocabulary is CLIP's byte alphabet (plain and "</w>"), the learned merges, and the
    two special tokens; <|endoftext|> also pads, as in SD 1.x."""
    from transformers import CLIPTokenizer

    corpus = list(captions) + [" ".join(extra_words)]
    merges = learn_merges(corpus)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for sym in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(sym, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=EOS)


def toy_tokenizer(num_captions: int = 5000, seed: int = 0):
    """The tokenizer of the toy base model: learned from `num_captions` training captions of the world."""
    return build_toy_tokenizer(world.base_example(seed, i)[1] for i in range(num_captions))
