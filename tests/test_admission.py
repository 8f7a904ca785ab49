"""Who may join a run (comm.admission): a run already training at an address is named and
refused, and with a run token only ranks that prove they know it get in, both ways. In-process,
on a real store, with no process group; the multi-rank case is in tests/test_reliability.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch.distributed as dist

from comm.admission import LIVE, Doorkeeper, ask_to_enter, open_run, read_card, refuse_if_live
from tests.helpers import store_client

TOKEN = "correct horse battery staple"
URL = "tcp://127.0.0.1:{port}"


def asking(port: int, rank: int, token: str | None) -> tuple[threading.Thread, list[BaseException | None]]:
    """``ask_to_enter`` on a thread of its own (it waits for rank 0's answer); its outcome lands
    in the list: None when admitted, else the error."""
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            ask_to_enter(store_client(port), rank, token, URL.format(port=port), timeout_s=10)
            outcome.append(None)
        except ConnectionError as err:
            outcome.append(err)

    thread = threading.Thread(target=ask)
    thread.start()
    return thread, outcome


def test_with_a_token_only_ranks_that_know_it_get_in_and_the_token_never_crosses(
    store: tuple[dist.TCPStore, int],
) -> None:
    main, port = store
    card = open_run(main, world_size=3, token=TOKEN)
    door = Doorkeeper("127.0.0.1", port, "", card, TOKEN, timeout_s=10)
    try:
        impostor, refused = asking(port, 1, "a guess")
        impostor.join(10)
        assert len(refused) == 1 and "its run token is not this run's" in str(refused[0])
        assert door.refused == 1 and door.admitted == {0}  # the run goes on waiting for the real rank 1
        for rank, answer in ((1, None), (1, "rank 1 is already in this run"), (2, None)):
            thread, outcome = asking(port, rank, TOKEN)  # the second rank 1: a seat already taken
            thread.join(10)
            assert len(outcome) == 1 and (outcome[0] is None if answer is None else answer in str(outcome[0]))
        assert door.admitted == {0, 1, 2}
    finally:
        door.stop()
    # what crossed the store: the card, challenges and MACs, never the token
    keys = ["run/card", *(f"run/{kind}/1/{i}" for kind in ("ask", "verdict") for i in (1, 2, 3)), "run/ask/2/1"]
    values = [main.get(key).decode() for key in keys]
    assert not any(TOKEN in value for value in values) and read_card(main).guarded


def test_a_rank_and_a_run_that_disagree_on_having_a_token_refuse_each_other(
    store: tuple[dist.TCPStore, int],
) -> None:
    main, port = store
    open_run(main, world_size=2, token=None)
    with pytest.raises(ConnectionError, match=r"this rank has a run token but the run at .* runs without one"):
        ask_to_enter(store_client(port), 1, TOKEN, URL.format(port=port), timeout_s=5)
    ask_to_enter(store_client(port), 1, None, URL.format(port=port), timeout_s=5)  # the same run, no token: in


def test_an_answer_that_does_not_prove_the_token_is_refused(store: tuple[dist.TCPStore, int]) -> None:
    """A process without the token posing as rank 0 (its card says guarded) cannot forge the
    admission: the rank refuses to join it."""
    main, port = store
    open_run(main, world_size=2, token="not the run's")
    door = Doorkeeper("127.0.0.1", port, "", read_card(main), "not the run's", timeout_s=10)
    try:
        # the stranger's doorkeeper finds this rank's MAC wrong; a forged "admitted" would not verify
        with pytest.raises(ConnectionError, match="refused by the run"):
            ask_to_enter(store_client(port), 1, TOKEN, URL.format(port=port), timeout_s=5)
    finally:
        door.stop()
    main.set("run/verdict/1/2", "admitted " + "0" * 64)  # forged, where this rank's next ask looks
    with pytest.raises(ConnectionError, match="does not prove the run token"):
        ask_to_enter(store_client(port), 1, TOKEN, URL.format(port=port), timeout_s=5)


def test_a_run_that_trains_is_named_and_refused(store: tuple[dist.TCPStore, int]) -> None:
    main, port = store
    open_run(main, world_size=4, token=None)
    refuse_if_live(main, URL.format(port=port), "rank 0")  # still gathering: not refused here
    main.set(LIVE, "1")
    with pytest.raises(ConnectionError, match=r"another run is already training at .* \(4 ranks, rank 0 on "):
        ask_to_enter(store_client(port), 2, None, URL.format(port=port), timeout_s=5)


def test_a_replica_joining_a_live_elastic_run_proves_the_token(store: tuple[dist.TCPStore, int]) -> None:
    """comm.membership: rank 0 of the live generation takes in a replica only when each of its
    ranks asked with the run's settings and a proof of its token over the launch's challenge."""
    from comm.admission import LAUNCH_SPACE
    from comm.membership import Membership, ask_to_join, joining_replicas

    main, _ = store
    open_run(dist.PrefixStore(LAUNCH_SPACE, main), world_size=4, token=TOKEN)
    live = Membership(1, (0,), pipeline_size=2)  # replica 1 (launch ranks 2, 3) left; it asks back
    ask_to_join(main, 1, 2, "settings", TOKEN)
    ask_to_join(main, 1, 3, "settings", "a guess")
    assert joining_replicas(main, live, 2, "settings", TOKEN) == []
    assert "its run token is not the run's" in main.get("gen1/refused/3").decode()
    assert not main.check(["gen1/refused/2"])
    ask_to_join(main, 1, 3, "settings", TOKEN)  # started again with the right token
    assert joining_replicas(main, live, 2, "settings", TOKEN) == [1]
    assert TOKEN not in main.get("gen1/join/3").decode()
    with pytest.raises(ConnectionError, match="the live elastic run needs a run token and this rank has none"):
        ask_to_join(main, 1, 3, "settings", None)


def test_a_public_rendezvous_without_a_token_is_pointed_out() -> None:
    from comm.admission import exposure

    said = exposure("8.8.8.8", None)
    assert said is not None and "public address (8.8.8.8)" in said and "DIST_CLM_RUN_TOKEN" in said
    assert exposure("8.8.8.8", TOKEN) is None  # guarded
    for private in ("10.77.0.1", "192.168.1.5", "127.0.0.1", "localhost"):
        assert exposure(private, None) is None, private


def test_the_token_is_kept_out_of_the_settings_and_needs_a_store() -> None:
    from comm.config import CommConfig

    with pytest.raises(ValueError, match="a run token needs a store to prove itself through"):
        CommConfig("file:///shared/rendezvous", run_token=TOKEN)
    settings = CommConfig("tcp://127.0.0.1:7033", run_token=TOKEN)
    assert TOKEN not in repr(settings)


def test_the_token_is_not_part_of_the_settings_fingerprint(
    tiny_shards: Path, two_tasks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint crosses the store in plain text: the token must not be hashed into it."""
    from trainer.cli import config_from_args, parse_args

    monkeypatch.delenv("DIST_CLM_RUN_TOKEN", raising=False)
    flags = ["--model-name", str(tiny_shards), "--task-name", two_tasks, "--rank", "0", "--world-size", "1"]
    plain = config_from_args(parse_args(flags))
    guarded = config_from_args(parse_args([*flags, "--run-token", TOKEN]))
    assert guarded.comm.run_token == TOKEN and plain.comm.run_token is None
    assert guarded.fingerprint() == plain.fingerprint()
    monkeypatch.setenv("DIST_CLM_RUN_TOKEN", TOKEN)
    assert config_from_args(parse_args(flags)).comm.run_token == TOKEN  # the environment, as documented
