"""Generation through the pipeline: every stage runs this loop over the same micro-batches of
prompts, keeping a key/value cache of its own layers for each.

A micro-batch enters with its left-padded prompts (the prefill) and then one token per pass.
The last stage samples the next token of every row from the final position's logits and sends
only those ids around to the first stage, which embeds them and starts the micro-batch's next
pass. The stages take the micro-batches in turn (0, 1, ..., m-1, 0, 1, ...), so with m >= p
micro-batches in flight every stage has one to compute while the others travel: the decode
bubble is what is left when m < p.

A micro-batch ends when each row has sampled an end-of-sequence token or reached
``--max-completion-length``; the last stage says so beside its last token ids, and the first
stage passes a done flag down the stages in that micro-batch's place, each dropping it from its
turn as the flag goes by. So the stages take the same micro-batches in the same order without a
word besides the tokens, and receives are posted in the order the sends leave.

Rows that ended go on being computed (their new tokens are the pad id and masked by nothing),
as HF's ``generate`` computes them: a row's tokens do not depend on which rows share its
micro-batch beyond what left padding changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from comm.decode import DecodeLinks, Waitable
from generation.sampling import Sampler


@dataclass(frozen=True)
class PromptBatch:
    """One micro-batch of prompts, left-padded: ``ids`` and ``padding`` (rows, longest), the
    latter 1 on a prompt's tokens and 0 on the padding before them."""

    ids: torch.Tensor
    padding: torch.Tensor

    @classmethod
    def left_padded(cls, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> PromptBatch:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt cannot be continued: give every prompt at least one token")
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
        padding = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            padding[row, longest - len(prompt) :] = 1
        return cls(ids.to(device), padding.to(device))

    @property
    def rows(self) -> int:
        return self.ids.shape[0]


@dataclass(frozen=True)
class Stops:
    """When a row's completion ends: an end-of-sequence id, or ``max_new_tokens`` of them.
    ``pad_id`` is what a row that ended is fed afterwards."""

    eos_ids: tuple[int, ...]
    max_new_tokens: int
    pad_id: int


@dataclass
class _InFlight:
    """One micro-batch on this stage: its cache, the padding mask and positions of what enters next."""

    prompts: PromptBatch
    cache: object
    padding: torch.Tensor  # (rows, cached + entering)
    positions: torch.Tensor  # (rows, entering)
    passes: int = 0  # passes this stage made of it
    tokens: list[torch.Tensor] = field(default_factory=list)  # sampled (last stage) or received (first), (rows,) each
    ended: torch.Tensor | None = None  # the last stage: rows that sampled an end-of-sequence id
    sent: Waitable | None = None  # this stage's last message about it, still in flight

    def advance(self) -> None:
        """The next pass carries one new token per row, one position on."""
        self.padding = torch.cat([self.padding, self.padding.new_ones(self.padding.shape[0], 1)], dim=1)
        self.positions = self.positions[:, -1:] + 1


def _prefill_positions(padding: torch.Tensor) -> torch.Tensor:
    """Positions 0.. from each prompt's first real token (padding 0), as HF's ``generate`` counts."""
    return (padding.cumsum(-1) - 1).masked_fill(padding == 0, 0)


def new_cache(config: object) -> object:
    """HF's growing key/value cache laid out for every layer of ``config`` (sliding windows
    included); a stage fills only its own layers' places."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def generate(
    stage: torch.nn.Module,
    links: DecodeLinks,
    batches: Sequence[PromptBatch],
    stops: Stops,
    sampler: Sampler | None,
    in_flight: int = 1,
    compute_dtype: torch.dtype | None = None,
) -> list[torch.Tensor] | None:
    """Run this stage's part of generating completions of ``batches``, ``in_flight`` micro-batches
    at a time (a micro-batch that ends makes room for the next). Every stage of the pipeline calls
    it with the same batches; the first and last stages return each batch's new tokens (rows,
    steps) (``stops.pad_id`` after a row's end), the others None."""
    topo = links.topo
    first, last = topo.is_first_stage, topo.is_last_stage
    hidden_size = stage.config.hidden_size
    device = batches[0].ids.device if batches else torch.device("cpu")
    autocast = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype is not None else nullcontext()
    flights: list[_InFlight] = []
    turn: deque[int] = deque()
    posted: dict[int, Waitable] = {}
    finished: list[torch.Tensor | None] = [None] * len(batches)

    def enter() -> None:
        """The next micro-batch of prompts joins the turn (at its end: every stage alike)."""
        if len(flights) < len(batches):
            b = batches[len(flights)]
            flights.append(_InFlight(b, new_cache(stage.config), b.padding, _prefill_positions(b.padding)))
            turn.append(len(flights) - 1)

    def leave(j: int) -> None:
        flight = flights[j]
        if first or last:
            finished[j] = torch.stack(flight.tokens, dim=1)
        flight.cache = flight.tokens = None  # its memory, for the next to enter
        enter()

    for _ in range(max(1, in_flight)):
        enter()
    eos = torch.tensor(stops.eos_ids, dtype=torch.long, device=device)

    def post(j: int) -> None:
        """Post micro-batch ``j``'s next input receive (in turn order: the order its sender sends)."""
        flight = flights[j]
        if j in posted or (first and (flight.passes == 0 or last)):
            return
        if first:
            posted[j] = links.post_recv_tokens(flight.prompts.rows)
        else:
            entering = flight.prompts.ids.shape[1] if flight.passes == 0 else 1
            posted[j] = links.post_recv_hidden((flight.prompts.rows, entering, hidden_size))

    def send(j: int, message: Waitable | None) -> None:
        flight = flights[j]
        if flight.sent is not None:  # long received: its receiver answered it since
            flight.sent.wait()
        flight.sent = message

    with torch.no_grad(), autocast:
        while turn:
            j = turn.popleft()
            flight = flights[j]
            post(j)
            if turn:
                post(turn[0])  # the next one's data moves while this one computes
            if first and flight.passes == 0:
                x, done = flight.prompts.ids, False
            elif first and last:
                x, done = flight.tokens[-1].unsqueeze(1), False
            else:
                x, done = posted.pop(j).wait()
                if first:
                    flight.tokens.append(x)  # the first stage keeps them too: it builds what trains on them
                    x = x.unsqueeze(1)  # (rows, 1) token ids
            if done:  # pass the flag on; the micro-batch leaves every stage's turn as it goes by
                if not last:
                    send(j, links.send_hidden(torch.zeros(flight.prompts.rows, 1, hidden_size, device=device), True))
                leave(j)
                continue
            if flight.passes > 0:
                flight.advance()
            out = stage.decode(x, flight.positions, flight.padding, flight.cache)
            flight.passes += 1
            if not last:
                send(j, links.send_hidden(out, False))
                turn.append(j)
                continue
            ended = _sample(stage, out, flight, sampler, eos, stops)
            if first:  # one stage: its own tokens come around at once
                if ended:
                    leave(j)
                else:
                    turn.append(j)
                continue
            send(j, links.send_tokens(flight.tokens[-1], ended))
            turn.append(j)  # until the done flag has gone round the stages
    for flight in flights:
        if flight.sent is not None:
            flight.sent.wait()
    return finished if first or last else None


def completions(tokens: Sequence[torch.Tensor], eos_ids: Sequence[int]) -> list[tuple[list[int], bool]]:
    """Each generated row (``generate``'s tokens, batch by batch) up to and including its first
    end-of-sequence token, and whether it was cut at the length instead."""
    rows = []
    for row in (r for batch in tokens for r in batch.tolist()):
        end = next((k for k, t in enumerate(row) if t in eos_ids), None)
        rows.append((row if end is None else row[: end + 1], end is None))
    return rows


def _sample(
    stage: torch.nn.Module, normed: torch.Tensor, flight: _InFlight, sampler: Sampler, eos: torch.Tensor,
    stops: Stops,
) -> bool:  # fmt: skip
    """The last stage: each row's next token from the final position; whether the micro-batch ended."""
    logits = stage.head.project(normed[:, -1]).float()  # (rows, vocab)
    tokens = sampler(logits)
    if flight.ended is None:
        flight.ended = torch.zeros_like(tokens, dtype=torch.bool)
    tokens = tokens.masked_fill(flight.ended, stops.pad_id)
    flight.ended = flight.ended | torch.isin(tokens, eos)
    flight.tokens.append(tokens)
    return bool(flight.ended.all()) or len(flight.tokens) >= stops.max_new_tokens
