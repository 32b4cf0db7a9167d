"""TurnIndex: which finished turns are kept, which later request loads which, and what is
evicted. Exact prefixes only (tokens, images, routing options), LRU within the bytes."""

from __future__ import annotations

import pytest

from vllm_recroute.kv.turn_index import TurnIndex, TurnRequest

BS = 4  # block size of the hashes
IMAGE = (2, 5, "img-a")  # offset, length, identifier: tokens 2..6


def _hashes(tokens, images) -> list:
    """Chained full-block hashes as vLLM builds them (tokens and the images they touch)."""
    out, prev = [], None
    for b in range(len(tokens) // BS):
        lo, hi = b * BS, (b + 1) * BS
        touched = tuple(im[2] for im in images if im[0] < hi and im[0] + im[1] > lo)
        prev = hash((prev, tuple(tokens[lo:hi]), touched))
        out.append(prev)
    return out


def _req(tokens, images=(IMAGE,), routing=(), salt=None) -> TurnRequest:
    return TurnRequest(list(tokens), _hashes(tokens, images), tuple(images), routing, salt)


TURN_1 = list(range(100, 111))  # 11 tokens: 2 full blocks + 3 in the tail


def _index(capacity_tokens: int = 100) -> TurnIndex:
    return TurnIndex(capacity_bytes=capacity_tokens * 10, block_size=BS, bytes_per_token=10)


def test_a_later_turn_matches_the_kept_prefix_exactly():
    index = _index()
    turn_id, evicted = index.keep(_req(TURN_1), 10)  # tokens 0..9 have KV
    assert (turn_id, evicted) == (0, [])
    later = _req([*TURN_1, 7, 8, 9])
    assert index.match(later, len(later.token_ids) - 1) == (0, 10)
    # the match never covers the request's last token (its logits must be computed)
    assert index.match(_req(TURN_1[:11]), 9) is None


@pytest.mark.parametrize(
    "change",
    ["tail token", "early token", "other image", "image in tail", "routing"],
)
def test_any_difference_in_the_prefix_is_a_miss(change):
    index = _index()
    index.keep(_req(TURN_1), 10)
    tokens, images, routing = [*TURN_1, 1, 2, 3], [IMAGE], ()
    if change == "tail token":
        tokens[9] = 0  # inside the partial block after the last full one
    elif change == "early token":
        tokens[0] = 0
    elif change == "other image":
        images = [(2, 5, "img-b")]
    elif change == "image in tail":
        images = [IMAGE, (9, 1, "img-c")]  # starts after the last full block
    else:
        routing = (("keep", "0.25"),)
    assert index.match(_req(tokens, images, routing), len(tokens) - 1) is None


def test_the_longest_kept_turn_wins_and_is_refreshed():
    index = _index()
    short, _ = index.keep(_req(TURN_1), 8)
    turn_2 = [*TURN_1, 5, 6, 7, 8, 9]
    long, _ = index.keep(_req(turn_2), 14)
    assert index.match(_req([*turn_2, 1]), 15) == (long, 14)
    assert index.match(_req([*TURN_1, 0, 0]), 12) == (short, 8)


def test_keeping_evicts_least_recently_used_first():
    index = _index(capacity_tokens=25)  # room for two 10-token turns
    a, _ = index.keep(_req(TURN_1), 10)
    other = [t + 50 for t in TURN_1]
    b, _ = index.keep(_req(other), 10)
    assert index.used_bytes == 200
    index.match(_req([*TURN_1, 1]), 11)  # a becomes most recently used
    third = [t + 90 for t in TURN_1]
    c, evicted = index.keep(_req(third), 10)
    assert evicted == [b] and len(index) == 2 and index.used_bytes == 200
    assert index.match(_req([*other, 1]), 11) is None
    assert index.match(_req([*TURN_1, 1]), 11) == (a, 10)
    assert (a, b, c) == (0, 1, 2)


def test_what_is_not_kept():
    index = _index(capacity_tokens=9)
    assert not index.can_keep(_req(TURN_1), 10)  # larger than the whole store
    index = _index()
    assert not index.can_keep(_req(TURN_1, images=()), 10)  # no image: nothing to save
    assert not index.can_keep(_req(TURN_1), 5)  # the image is not whole before token 5
    index.keep(_req(TURN_1), 10)
    assert not index.can_keep(_req(TURN_1), 10)  # already kept
    with pytest.raises(ValueError, match="can_keep"):
        index.keep(_req(TURN_1), 10)


def test_a_turn_is_also_entered_at_its_prompt_and_evicted_as_a_whole():
    index = _index(capacity_tokens=15)
    turn_id, _ = index.keep(_req(TURN_1), 10, also_at=(8, 4))  # 4 cuts the image: ignored
    assert index.used_bytes == 100  # bytes of the whole turn, once
    respelled = [*TURN_1[:8], 0, 0, 0, 5]  # same prompt (8 tokens), another answer
    assert index.match(_req(respelled), 11) == (turn_id, 8)
    assert index.match(_req([*TURN_1[:4], 0, 0, 0, 0, 0]), 8) is None
    other, evicted = index.keep(_req([t + 50 for t in TURN_1]), 10)
    assert evicted == [turn_id] and len(index) == 1 and index.used_bytes == 100
    assert index.match(_req(respelled), 11) is None
    assert other == 1


def test_a_turn_shorter_than_one_block_is_keyed_by_all_its_tokens():
    index = TurnIndex(capacity_bytes=1000, block_size=64, bytes_per_token=10)
    turn_id, _ = index.keep(_req(TURN_1), 10)
    assert index.match(_req([*TURN_1, 1]), 11) == (turn_id, 10)
    assert index.match(_req([0, *TURN_1[1:], 1]), 11) is None
    assert index.match(_req([*TURN_1, 1], images=[(2, 5, "img-b")]), 11) is None


def test_requests_are_keyed_by_their_routing_options_and_bad_ones_never_raise():
    from types import SimpleNamespace

    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.connector.scheduler import turn_request
    from vllm_recroute.requests.resolution import resolve_options

    def _turn_request(req):
        extra = req.sampling_params.extra_args
        return turn_request(req, resolve_options(RoutingConfig(), extra, "r"))

    def request(extra):
        image = SimpleNamespace(mm_position=SimpleNamespace(offset=2, length=5), identifier="a")
        return SimpleNamespace(
            all_token_ids=TURN_1,
            block_hashes=_hashes(TURN_1, [IMAGE]),
            mm_features=[image],
            sampling_params=SimpleNamespace(extra_args=extra),
        )

    plain = _turn_request(request(None))
    assert plain.images == ((2, 5, "a"),) and plain.routing == ()
    # the decode pace does not change the stage layout; the budget does
    assert _turn_request(request({"recroute_reroute_every": 4})).routing == ()
    assert _turn_request(request({"recroute_keep": 0.25})).routing == (("keep", "0.25"),)
    bad = _turn_request(request({"recroute_bogus": 1}))  # offline API, not validated
    assert bad.routing != () and bad.routing != plain.routing


@pytest.mark.parametrize("block_size", [BS, 64], ids=["full blocks", "shorter than a block"])
def test_a_turn_kept_under_one_salt_is_never_loaded_under_another(block_size):
    """cache_salt isolates tenants: a kept turn serves its own salt only, never another or
    none, whether its key holds a chained block hash or (shorter than a block) its tokens.
    The hashes here carry no salt: the key itself must keep tenants apart."""
    index = TurnIndex(capacity_bytes=1000, block_size=block_size, bytes_per_token=10)
    tenant_a, _ = index.keep(_req(TURN_1, salt="tenant-a"), 10)
    later = [*TURN_1, 1]
    assert index.match(_req(later, salt="tenant-b"), 11) is None
    assert index.match(_req(later), 11) is None
    assert index.match(_req(later, salt="tenant-a"), 11) == (tenant_a, 10)
    # the same tokens unsalted are another tenant's turn, kept and matched on their own
    unsalted, _ = index.keep(_req(TURN_1), 10)
    assert index.match(_req(later), 11) == (unsalted, 10)
    assert unsalted != tenant_a and len(index) == 2


def test_the_scheduler_request_carries_its_cache_salt():
    from types import SimpleNamespace

    from vllm_recroute.config import RoutingConfig
    from vllm_recroute.connector.scheduler import turn_request
    from vllm_recroute.requests.resolution import resolve_options

    def _turn_request(req):
        return turn_request(req, resolve_options(RoutingConfig(), None, "r"))

    def request(salt):
        return SimpleNamespace(
            all_token_ids=TURN_1,
            block_hashes=_hashes(TURN_1, [IMAGE]),
            mm_features=[],
            sampling_params=None,
            cache_salt=salt,
        )

    assert _turn_request(request("tenant-a")).salt == "tenant-a"
    assert _turn_request(request(None)).salt is None
    assert _turn_request(request("")).salt is None  # empty salt: none, as in vLLM
