"""Who may join a run, decided through its rendezvous store before any process group is made.

Rank 0 puts a card in the store: where and since when it runs, how many ranks, whether a run
token guards it, and a fresh random challenge; once the run trains, the card says so. A rank
that reaches a store whose run already trains is refused at once, naming that run (two runs
started on one address by mistake do not mix), and so is a rank 0 whose port is taken by a live
run's store.

With a run token (``--run-token`` or the environment variable ``DIST_CLM_RUN_TOKEN``, the same
on every rank) each rank proves it knows the token before rank 0 lets it in: it asks with a
challenge of its own and HMAC-SHA256(token, rank 0's challenge, its rank, its challenge); rank 0
answers with HMAC(token, "admitted", its rank, its challenge), which the rank checks in turn, so
neither side joins a stranger. Only challenges and MACs cross the store: the token itself never
travels, is never written and is never logged. What this does not protect is the traffic itself
(tensors cross in the clear): between sites, run it through a tunnel.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)

TOKEN_ENV = "DIST_CLM_RUN_TOKEN"
CARD = "run/card"  # rank 0's card, as JSON
LIVE = "run/live"  # set once the run trains
_ASKS = "run/asks/"  # run/asks/<rank>: how many times that rank asked (a counter)
_ASK = "run/ask/"  # run/ask/<rank>/<i>: the i-th ask, "<challenge> <mac>"
_VERDICT = "run/verdict/"  # run/verdict/<rank>/<i>: "admitted <mac>" or "refused <why>"
POLL_S = 0.05
# where the launch's ranks pass rank 0's door in an elastic run's store (generation 0's key space)
LAUNCH_SPACE = "gen0/"
NOTE_AFTER_S, NOTE_EVERY_S = 5.0, 30.0  # a rank waiting (here or in comm.rendezvous) says so after 5 s, then every 30 s


def _mac(token: str, *parts: object) -> str:
    return hmac.new(token.encode(), "|".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Card:
    """What rank 0 tells every rank about the run at its address (nothing secret)."""

    host: str
    started: float  # unix time
    world_size: int
    guarded: bool  # a run token is needed to join
    challenge: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        guard = "with a run token" if self.guarded else "without a run token"
        return f"{self.world_size} ranks, rank 0 on {self.host} since {since}, {guard}"


def open_run(store: dist.Store, world_size: int, token: str | None) -> Card:
    """Rank 0: put this run's card in its store."""
    card = Card(socket.gethostname(), time.time(), world_size, token is not None, secrets.token_hex(16))
    store.set(CARD, json.dumps(card.__dict__))
    return card


def read_card(store: dist.Store) -> Card | None:
    return Card(**json.loads(store.get(CARD))) if store.check([CARD]) else None


def refuse_if_live(store: dist.Store, dist_url: str, who: str) -> None:
    """A store that already serves a training run is another run's: stop, naming it."""
    card = read_card(store)
    if card is not None and store.check([LIVE]):
        raise ConnectionError(
            f"{who}: another run is already training at {dist_url} ({card.describe()}); give this run a port of "
            "its own in --dist-url (or wait until that run ends)"
        )


def ask_to_enter(store: dist.Store, rank: int, token: str | None, dist_url: str, timeout_s: float) -> None:
    """A rank other than 0: check the run at ``dist_url`` is the one meant and, if it is guarded,
    prove the token and check rank 0's answer. Raises a one-line ConnectionError when refused."""
    who = f"rank {rank}"
    started = time.monotonic()
    deadline, note = started + timeout_s, started + NOTE_AFTER_S
    card = read_card(store)
    while card is None:  # rank 0 writes it as soon as its store listens (torchrun's agent may host the store)
        if time.monotonic() > deadline:
            raise ConnectionError(
                f"{who}: rank 0 did not open the run at {dist_url} within {timeout_s:g}s: start rank 0 with the "
                "same --dist-url, or check that the store there is this run's"
            )
        if time.monotonic() > note:
            log.warning("%s: the store at %s answers, but rank 0 has not opened the run there yet (%.0fs); waiting",
                        who, dist_url, time.monotonic() - started)  # fmt: skip
            note = time.monotonic() + NOTE_EVERY_S
        time.sleep(POLL_S)
        card = read_card(store)
    refuse_if_live(store, dist_url, who)
    if card.guarded != (token is not None):
        has, wants = ("has a run token", "runs without one") if token is not None else ("has no run token", "needs one")
        raise ConnectionError(
            f"{who}: this rank {has} but the run at {dist_url} ({card.describe()}) {wants}: give every rank the "
            f"same --run-token (or {TOKEN_ENV}), or none at all"
        )
    if token is None:
        return
    mine = secrets.token_hex(16)
    ask = store.add(f"{_ASKS}{rank}", 1)
    store.set(f"{_ASK}{rank}/{ask}", f"{mine} {_mac(token, card.challenge, rank, mine)}")
    verdict_key = f"{_VERDICT}{rank}/{ask}"
    while not store.check([verdict_key]):
        if time.monotonic() > deadline:
            raise ConnectionError(f"{who}: rank 0 at {dist_url} did not answer this rank's proof of the run token "
                                  f"within {timeout_s:g}s")  # fmt: skip
        time.sleep(POLL_S)
    verdict, _, detail = store.get(verdict_key).decode().partition(" ")
    if verdict != "admitted":
        raise ConnectionError(f"{who}: refused by the run at {dist_url}: {detail}")
    if not hmac.compare_digest(detail, _mac(token, "admitted", rank, mine)):
        raise ConnectionError(
            f"{who}: the answer from {dist_url} does not prove the run token: a process without it answers "
            "there; check --dist-url"
        )


def join_proof(token: str, challenge: str, launch_rank: int, fingerprint: str) -> str:
    """A rank joining a live elastic run (comm.membership): its proof of the token over the
    launch's challenge, its rank and its settings."""
    return _mac(token, challenge, "join", launch_rank, fingerprint)


class Doorkeeper:
    """Rank 0 of a guarded run: a thread (with a store client of its own: one operation at a time
    per client) that answers each rank's asks until every rank is in or ``stop()``."""

    def __init__(self, host: str, port: int, prefix: str, card: Card, token: str, timeout_s: float) -> None:
        self.card, self.token = card, token
        self.admitted: set[int] = {0}
        self.refused = 0
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        self._store = dist.PrefixStore(prefix, store) if prefix else store
        self._seen = dict.fromkeys(range(1, card.world_size), 0)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="run-doorkeeper", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._done.is_set() and len(self.admitted) < self.card.world_size:
                for rank in range(1, self.card.world_size):
                    self._answer(rank)
                self._done.wait(POLL_S)
        except (RuntimeError, OSError):  # the store went away: the run is ending anyway
            return

    def _answer(self, rank: int) -> None:
        asked = self._store.add(f"{_ASKS}{rank}", 0)
        while self._seen[rank] < asked:
            self._seen[rank] += 1
            key = f"{_ASK}{rank}/{self._seen[rank]}"
            if not self._store.check([key]):  # counted before it was written: read it next round
                self._seen[rank] -= 1
                return
            challenge, _, mac = self._store.get(key).decode().partition(" ")
            verdict = f"{_VERDICT}{rank}/{self._seen[rank]}"
            expected = _mac(self.token, self.card.challenge, rank, challenge)
            if rank in self.admitted:
                self._store.set(verdict, f"refused rank {rank} is already in this run")
            elif hmac.compare_digest(mac, expected):
                self.admitted.add(rank)
                self._store.set(verdict, f"admitted {_mac(self.token, 'admitted', rank, challenge)}")
            else:
                self.refused += 1
                self._store.set(verdict, f"refused its run token is not this run's (give rank {rank} the run's "
                                         f"--run-token or {TOKEN_ENV})")  # fmt: skip
                log.warning("refused a process asking to join as rank %d: it does not know this run's token", rank)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=2.0)


def exposure(dist_url_host: str | None, token: str | None) -> str | None:
    """A warning when the rendezvous listens at a public address with no run token guarding it
    (anyone who reaches the port could join or write), else None. A name is resolved first;
    one that does not resolve here is left alone (the rendezvous will say so)."""
    if token is not None or not dist_url_host:
        return None
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(dist_url_host, None)}
    except OSError:
        return None
    public = sorted(a for a in addresses if ipaddress.ip_address(a.split("%")[0]).is_global)
    if not public:
        return None
    return (
        f"the rendezvous at {dist_url_host} is a public address ({', '.join(public)}) and no run token guards it: "
        f"anyone who reaches its port can join or write; set {TOKEN_ENV} (or --run-token) on every rank, and "
        "carry the traffic through a tunnel between sites"
    )


def token_from(flag: str | None) -> str | None:
    """The run token: the flag, else the environment variable, else none (empty means none)."""
    token = flag if flag is not None else os.environ.get(TOKEN_ENV)
    return token or None


def refusal(store: dist.Store, asked: str, rank: int, fingerprint: str, token: str | None) -> str | None:
    """Why a rank asking with ``asked`` ("<fingerprint> <proof>") may not enter, or None."""
    theirs, _, proof = asked.partition(" ")
    if theirs != fingerprint:
        return "its settings differ from the live run's; start it with the same flags"
    if token is not None:
        challenge = read_card(dist.PrefixStore(LAUNCH_SPACE, store)).challenge
        if not hmac.compare_digest(proof, join_proof(token, challenge, rank, theirs)):
            return f"its run token is not the run's (give it the run's --run-token or {TOKEN_ENV})"
    return None


def ask_with_proof(store: dist.Store, key: str, launch_rank: int, fingerprint: str, token: str | None) -> None:
    """Ask under ``key`` with this rank's settings and, when the run is guarded, a proof of the
    run token over the launch's challenge (``join_proof``); a rank that has a token the run
    lacks, or lacks the one it has, stops here."""
    card = read_card(dist.PrefixStore(LAUNCH_SPACE, store))
    guarded = card is not None and card.guarded
    if guarded != (token is not None):
        raise ConnectionError(
            f"rank {launch_rank}: the live elastic run {'needs' if guarded else 'runs without'} a run token and "
            f"this rank has {'none' if token is None else 'one'}: give every rank the same --run-token (or "
            f"{TOKEN_ENV}), or none at all"
        )
    proof = join_proof(token, card.challenge, launch_rank, fingerprint) if token is not None else ""
    store.set(key, f"{fingerprint} {proof}")
