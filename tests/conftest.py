"""Shared fixtures: one CPU thread, hypothesis settings, tiny targets, and the drafter factory list.

Every lossless-equality test is parametrized over ``DRAFTER_FACTORIES``: add a drafter there (a name and a
``factory(target, tokenizer) -> Drafter``) and it is held to token-identical greedy output automatically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings

from specdec import registry
from tests.tiny import tiny_llama, tiny_tokenizer

# another process may be benchmarking on this 2-core machine; tiny models gain nothing from threads anyway
torch.set_num_threads(1)

settings.register_profile("specdec", deadline=None, max_examples=60, database=None, print_blob=True)
settings.load_profile("specdec")


# ---------------------------------------------------------------- drafter factories


@dataclass(frozen=True)
class DrafterFactory:
    """A named way to build a drafter for a target (and its tokenizer).

    ``self_draft``: the drafter runs the target itself as a chain drafter, so every draft token must be accepted.
    """

    name: str
    build: Callable  # (target, tokenizer) -> Drafter
    self_draft: bool = False

    def __repr__(self) -> str:  # shown in test ids
        return self.name


DRAFTER_FACTORIES: list[DrafterFactory] = [
    DrafterFactory("none", lambda target, tok: registry.build_drafter("none", target, tok)),
    DrafterFactory("ngram", lambda target, tok: registry.build_drafter("ngram", target, tok)),
    DrafterFactory("ngram-min1", lambda target, tok: registry.build_drafter("ngram", target, tok, min_ngram=1)),
    # suffix decoding with a cache of its own, and one shared by every build in the process (earlier tests' requests
    # on other tiny targets become candidates: wrong guesses the verifier must reject)
    DrafterFactory("suffix", lambda target, tok: _suffix(target, tok, private=True)),
    DrafterFactory("suffix-shared", lambda target, tok: _suffix(target, tok, private=False)),
    # token recycling with a table of its own, and one shared by every build in the process (other tiny targets'
    # predictions become candidates: wrong guesses the verifier must reject)
    DrafterFactory("recycling", lambda target, tok: _recycling(target, tok, private=True)),
    DrafterFactory("recycling-shared", lambda target, tok: _recycling(target, tok, private=False)),
]


def _recycling(target, tok, *, private: bool):
    from drafters.recycling import RecyclingDrafter
    from drafters.successor_table import SuccessorTable

    return RecyclingDrafter(target, tok, k=4, min_score=0.0, table="tests",
                            successor_table=SuccessorTable(k=4) if private else None)


def _suffix(target, tok, *, private: bool):
    from drafters.suffix import SuffixDrafter
    from drafters.suffix_cache import SuffixCache

    return SuffixDrafter(target, tok, min_share=0.0, cache="tests", suffix_cache=SuffixCache() if private else None)

# ---- the draft-model drafter: a tiny random draft model (or the target itself) as a chain, a tree, a dynamic tree
DRAFT_MODEL_SEED = 1234  # a tiny draft model with other weights than any target used in the tests


def _draft_model(target, tok, *, depth: int, width: int, self_draft: bool = False, dynamic: bool = False):
    from drafters.draft_model import DraftModelDrafter

    model = target if self_draft else tiny_llama(DRAFT_MODEL_SEED, dtype=target.dtype, layers=1)
    return DraftModelDrafter(target, tok, model=model, depth=depth, width=width, dynamic=dynamic, top_k=3)


DRAFTER_FACTORIES += [
    DrafterFactory("draft_model-chain", lambda t, k: _draft_model(t, k, depth=4, width=1)),
    DrafterFactory("draft_model-tree", lambda t, k: _draft_model(t, k, depth=3, width=3)),
    # the target drafting for itself: a chain whose every token the target accepts
    DrafterFactory("draft_model-self", lambda t, k: _draft_model(t, k, depth=4, width=1, self_draft=True),
                   self_draft=True),
    # EAGLE-2-style dynamic tree: grown by cumulative draft probability, cut to the step's budget
    DrafterFactory("draft_model-dynamic", lambda t, k: _draft_model(t, k, depth=4, width=1, dynamic=True)),
]


# ---- trained drafters, held to losslessness with random weights (training only changes how much is accepted)


def _eagle(target, tok, *, choices=None, vocab: int | None = None, dynamic: bool = False):
    from drafters.eagle import EagleDrafter, EagleHead

    torch.manual_seed(7)
    v = target.config.vocab_size
    # a reduced vocabulary is a shuffled subset: draft index i is not token i, so a missed id mapping shows
    d2t = torch.arange(v) if vocab is None else torch.randperm(v, generator=torch.Generator().manual_seed(3))[:vocab]
    head = EagleHead.for_target(target, d2t).to(target.dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    return EagleDrafter(target, tok, head=head.eval(), choices=choices, dynamic=dynamic, top_k=3,
                        depth=4 if dynamic else None)


def _medusa(target, tok, *, choices=None, dynamic: bool = False):
    from drafters.medusa import MedusaDrafter, MedusaHeads

    heads = MedusaHeads.for_target(target, 3, 1, torch.arange(target.config.vocab_size))
    heads.init_from_target(target)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in heads.blocks:
            block[0].linear.weight.copy_(torch.randn(block[0].linear.weight.shape, generator=g))
    return MedusaDrafter(target, tok, heads=heads.to(target.dtype), choices=choices, dynamic=dynamic, top_k=3)


def _hybrid(target, tok):
    from drafters.hybrid import HybridDrafter

    # a random EAGLE-style head (nothing is shipped for tiny targets), given as an object
    return HybridDrafter(target, tok, drafters=[{"name": "ngram", "min_ngram": 1},
                                                _eagle(target, tok, vocab=48, dynamic=True)])


_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
DRAFTER_FACTORIES += [
    DrafterFactory("eagle-chain", lambda t, k: _eagle(t, k, choices=[[0], [0, 0], [0, 0, 0]])),
    DrafterFactory("eagle-tree-reduced-vocab", lambda t, k: _eagle(t, k, choices=_TREE, vocab=48)),
    DrafterFactory("eagle-dynamic", lambda t, k: _eagle(t, k, vocab=48, dynamic=True)),
    DrafterFactory("medusa-tree", lambda t, k: _medusa(t, k, choices=_TREE)),
    DrafterFactory("medusa-dynamic", lambda t, k: _medusa(t, k, dynamic=True)),
    # n-gram beside a (random) EAGLE-style head with dynamic trees, merged into one tree
    DrafterFactory("hybrid-ngram-eagle", lambda t, k: _hybrid(t, k)),
    # tiny targets have 2 layers: skip the attention of layer 1 (layer 0 is always kept)
    DrafterFactory("layerskip-tree", lambda t, k: registry.build_drafter("layerskip", t, k, skip_attention=[1],
                                                                         depth=3, width=2)),
]


@pytest.fixture(params=DRAFTER_FACTORIES, ids=lambda f: f.name)
def drafter_factory(request) -> DrafterFactory:
    return request.param


# ---------------------------------------------------------------- tiny models


_MODELS: dict[tuple, torch.nn.Module] = {}


def get_tiny(seed: int = 0, dtype: torch.dtype = torch.float64, **cfg) -> torch.nn.Module:
    """A tiny random Llama, built once per (seed, dtype, config) for the whole session (never mutate it)."""
    key = (seed, dtype, tuple(sorted(cfg.items())))
    if key not in _MODELS:
        _MODELS[key] = tiny_llama(seed, dtype=dtype, **cfg)
    return _MODELS[key]


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def target():
    """The default tiny target (seed 0, float64)."""
    return get_tiny(0)


def char_tokenizer():
    """A character-level tokenizer over the tiny models' 96 ids (0-2 special, 3-95 one character each).

    Stop strings need it: transformers' ``StopStringCriteria`` (used by ``model.generate`` and by specdec's Stopper)
    cleans the vocabulary by decoding a static prefix ``"abcdef"`` before each token, which the word-level
    ``tests.tiny.tiny_tokenizer`` maps to ``<unk>`` (ValueError: substring not found). Characters also let a stop
    string span several tokens.
    """
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny import SPECIAL, VOCAB

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,;:!?-+*/=()[]{}<>'\"#$%&@^_~|"
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for c in chars[:VOCAB - len(SPECIAL)]:
        vocab[c] = len(vocab)
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def greedy_reference(model, ids: torch.Tensor, max_new_tokens: int, **kwargs) -> list[int]:
    """The new tokens of ``model.generate(do_sample=False)`` — tokens only, for building inputs.

    To check losslessness compare whole (tokens, length and finish reason): ``tests.equality.greedy_ref`` and
    ``assert_greedy_equal``.
    """
    from tests.equality import greedy_ref

    return greedy_ref(model, ids, max_new_tokens, **kwargs).tokens
