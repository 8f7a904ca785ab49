"""The schedule simulator (pipeline.simulate) on our schedules' own orders: the textbook step
lengths and idle shares for equal stages, and a refusal of orders that wait on each other."""

from __future__ import annotations

import pytest

from pipeline.schedule import gpipe_step, one_f_one_b_step, zero_bubble_step
from pipeline.simulate import closed_form_idle, schedule_orders, simulate


@pytest.mark.parametrize(("stages", "micro_batches"), [(2, 4), (4, 8), (3, 3)])
def test_gpipe_and_1f1b_take_m_plus_p_minus_1_slots(stages: int, micro_batches: int) -> None:
    """F of length 1 and B of 2 on equal stages: both schedules run every F and B once a stage
    and end after (m + p - 1)(F + B); the first stage, whose last backward ends the step, idles
    the textbook share (p - 1)/(m + p - 1)."""
    for step in (gpipe_step, one_f_one_b_step):
        orders = schedule_orders(step, stages, micro_batches)
        assert [sorted(order) for order in orders] == [
            sorted([("F", i) for i in range(micro_batches)] + [("B", i) for i in range(micro_batches)])
        ] * stages
        result = simulate(orders, lambda kind, s, i: {"F": 1.0, "B": 2.0}[kind])
        assert result.step == pytest.approx((micro_batches + stages - 1) * 3.0)
        assert result.busy == (micro_batches * 3.0,) * stages
        assert result.ends[0] == result.step
        first_idle = 1 - result.busy[0] / result.ends[0]
        assert first_idle == pytest.approx(closed_form_idle(stages, micro_batches, 1.0, 2.0))


def test_zero_bubble_fills_the_cool_down_with_weight_gradients() -> None:
    """ZB-H1 with F = B = W = 1 on 4 stages, 8 micro-batches: each stage's first forward waits s
    slots and it then never idles, so the step is 3m + p - 1 (a third of 1F1B's 3 (p - 1) bubble)
    and every W of stage 0 runs after its B of the same micro-batch."""
    orders = schedule_orders(zero_bubble_step, 4, 8)
    result = simulate(orders, lambda kind, s, i: 1.0)
    assert result.step == pytest.approx(3 * 8 + 4 - 1)
    # 1F1B's backward is B and W in one (length 2): its bubble is three times as long
    one_f_one_b = simulate(schedule_orders(one_f_one_b_step, 4, 8), lambda kind, s, i: 2.0 if kind == "B" else 1.0)
    assert one_f_one_b.step - 8 * 3 == pytest.approx(3 * (result.step - 8 * 3)) == pytest.approx(3 * 3)
    first = orders[0]
    assert all(first.index(("W", i)) > first.index(("B", i)) for i in range(8))


def test_orders_that_wait_on_each_other_are_refused() -> None:
    with pytest.raises(ValueError, match="wait on each other for ever"):
        simulate([[("B", 0), ("F", 0)], [("F", 0), ("B", 0)]], lambda kind, s, i: 1.0)
