"""Fused recurrent steps that write the state in place (staterank.backends.in_place), on the CPU route."""

from __future__ import annotations

import pytest
import torch
from reference import delta_rule_loop

from staterank.backends import in_place
from staterank.backends.delta_rule import fused_recurrent_delta_rule
from staterank.loading import prepare_runtime
from staterank.models import HeadFeatures

prepare_runtime("delta_net")
import fla.layers.delta_net as fla_delta_net  # noqa: E402
from fla.ops.delta_rule import fused_recurrent_delta_rule as fla_fused_recurrent_delta_rule  # noqa: E402


def inputs(seed: int = 0, batch: int = 2, heads: int = 3, d_k: int = 8, d_v: int = 6):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, 1, heads, d_k, generator=g) for _ in range(2))
    v = torch.randn(batch, 1, heads, d_v, generator=g)
    beta = torch.rand(batch, 1, heads, generator=g)
    state = torch.randn(batch, heads, d_k, d_v, generator=g)
    return q, k, v, beta, state


def expected_step(q, k, v, beta, state):
    """One token from ``state`` by the per-token loop of the test reference (no decay, q and k L2-normalised)."""
    features = HeadFeatures(layer=0, hidden=q, q=q.double(), k=k.double(), v=v.double(), beta=beta.double(),
                            log_decay=None)
    return delta_rule_loop(features, initial_state=state.double())


def test_an_eligible_step_overwrites_its_initial_state():
    q, k, v, beta, state = inputs()
    address, before = state.data_ptr(), state.clone()
    o, final = in_place.step("delta_rule", fla_fused_recurrent_delta_rule, fused_recurrent_delta_rule,
                             (q, k, v, beta), {"initial_state": state, "output_final_state": True,
                                               "use_qk_l2norm_in_kernel": True}, False)
    assert final is state and state.data_ptr() == address
    o_ref, state_ref = expected_step(q, k, v, beta, before)
    torch.testing.assert_close(state.double(), state_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        {"output_final_state": False},
        {"cu_seqlens": torch.tensor([0, 1, 2])},
        {"initial_state": None},
        {"state_dtype": torch.float64},
    ],
    ids=["no-final-state", "packed", "no-state", "float64"],
)
def test_other_steps_are_left_to_their_kernel(change):
    q, k, v, beta, state = inputs()
    state = state.to(change.pop("state_dtype", torch.float32))
    kwargs = {"initial_state": state, "output_final_state": True, **change}
    before = state.clone()
    assert in_place.step("delta_rule", fla_fused_recurrent_delta_rule, fused_recurrent_delta_rule,
                         (q, k, v, beta), kwargs, False) is None
    assert torch.equal(state, before)


def test_a_state_recording_autograd_is_not_overwritten():
    q, k, v, beta, state = inputs()
    state.requires_grad_(True)
    kwargs = {"initial_state": state, "output_final_state": True}
    assert in_place.step("delta_rule", fla_fused_recurrent_delta_rule, fused_recurrent_delta_rule,
                         (q, k, v, beta), kwargs, False) is None
    with torch.no_grad():
        assert in_place.step("delta_rule", fla_fused_recurrent_delta_rule, fused_recurrent_delta_rule,
                             (q, k, v, beta), kwargs, False) is not None


def test_the_patched_layer_function_writes_in_place_only_when_asked():
    q, k, v, beta, state = inputs(seed=3)
    kwargs = {"initial_state": state, "output_final_state": True, "use_qk_l2norm_in_kernel": True}
    _, outside = fla_delta_net.fused_recurrent_delta_rule(q, k, v, beta, **kwargs)
    assert outside is not state
    with in_place.states_in_place():
        assert in_place.active()
        _, inside = fla_delta_net.fused_recurrent_delta_rule(q, k, v, beta, **kwargs)
    assert not in_place.active()
    assert inside is state
    torch.testing.assert_close(state, outside)
