"""Every registered sampler (sampler_matrix.CASES, from the definitions): the fast form the
processor calls against the float64 reference, at the declared defaults and at both ends of every
parameter's range, and the invariants every sampler keeps (hypothesis, over the whole declared
ranges): never empty, never NaN, the top token kept, -inf stays -inf, rows not selected bitwise
untouched, kept mass >= the parameter a definition names as its lower bound (typical_p).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sampler_matrix import CASES, NEG_INF, SETTING_T0, SETTINGS, SamplerCase, param_tensors

from vllm_adaptive.sampling.registry import SAMPLERS

PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# (logits [R, V], rows [K] or None, values {key: tensor [K]}, t0 [K])
Batch = tuple[torch.Tensor, "torch.Tensor | None", dict[str, torch.Tensor], torch.Tensor]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def random_rows(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Normal rows plus the awkward ones: -inf entries, all equal, one finite logit, none finite."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 2.5
    x[1, ::4] = NEG_INF
    x[2] = 0.75
    x[3] = NEG_INF
    x[3, 7] = 1.0
    x[4] = NEG_INF
    x[5, : vocab // 2] = x[5, 0]  # a long tie at one value
    return x


def assert_matches_reference(
    case: SamplerCase, before: torch.Tensor, after: torch.Tensor, params: dict[str, float], t0: float
) -> None:
    for r in range(before.shape[0]):
        expected = case.reference(before[r], params, t0)
        got = after[r].double()
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), (
            f"{case} row {r} {params}: kept {int(torch.isfinite(got).sum())} tokens, "
            f"reference keeps {int(torch.isfinite(expected).sum())}"
        )
        finite = torch.isfinite(expected)
        if case.definition.rescales:
            close = torch.allclose(got[finite], expected[finite], rtol=2e-5, atol=1e-6)
            assert close, f"{case} row {r}: rescaled logits differ"
        else:
            same = torch.equal(after[r][finite], before[r][finite])
            assert same, f"{case} row {r}: kept values changed"


def test_every_sampler_is_in_the_matrix() -> None:
    assert [c.name for c in CASES] == list(SAMPLERS)
    assert len(CASES) == 8


@pytest.mark.parametrize("which", SETTINGS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_matches_reference_on_random_rows(case: SamplerCase, which: str) -> None:
    params = dict(case.settings[which])
    t0 = SETTING_T0[which]
    for seed, vocab in [(0, 97), (1, 1000)]:
        before = random_rows(8, vocab, seed)
        after = before.clone()
        case.fast(after, param_tensors(params, 8), torch.full((8,), t0))
        assert_matches_reference(case, before, after, params, t0)


@pytest.mark.parametrize("which", SETTINGS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_only_selected_rows_change(case: SamplerCase, which: str) -> None:
    before = random_rows(8, 300, seed=2)
    after = before.clone()
    rows = torch.tensor([6, 0, 3])
    t0 = SETTING_T0[which]
    case.fast(after, param_tensors(case.settings[which], 3), torch.full((3,), t0), rows)
    untouched = [1, 2, 4, 5, 7]
    assert torch.equal(bits(after[untouched]), bits(before[untouched]))
    assert_matches_reference(case, before[rows], after[rows], dict(case.settings[which]), t0)


@pytest.mark.parametrize("case", [c for c in CASES if c.definition.identity is not None], ids=str)
def test_identity_parameters_leave_rows_bitwise_untouched(case: SamplerCase) -> None:
    assert case.definition.identity is not None
    before = random_rows(8, 300, seed=3)
    before[0, 3] = -0.0
    after = before.clone()
    case.fast(after, param_tensors(case.definition.identity, 8), torch.full((8,), 0.7))
    assert torch.equal(bits(after), bits(before))


@pytest.mark.parametrize("which", SETTINGS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_single_finite_logit_survives(case: SamplerCase, which: str) -> None:
    before = torch.full((1, 5), NEG_INF)
    before[0, 2] = -3.0
    after = before.clone()
    case.fast(after, param_tensors(case.settings[which], 1), torch.full((1,), SETTING_T0[which]))
    assert torch.equal(bits(after), bits(before))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_parameter_shape_is_checked(case: SamplerCase) -> None:
    with pytest.raises(ValueError, match=r"a tensor \[2\] \(one per selected row\), got \[3\]"):
        case.fast(
            torch.zeros(4, 10), param_tensors(case.settings["defaults"], 3), torch.ones(3),
            torch.tensor([0, 1]),
        )


@st.composite
def batches(draw: st.DrawFn, case: SamplerCase) -> Batch:
    n_rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(1, 24))
    value = st.one_of(
        st.floats(-30, 30, allow_nan=False, width=32),
        st.floats(-1e3, 1e3, allow_nan=False, width=32),
        st.just(NEG_INF),
        st.sampled_from([0.0, 1.0, -2.0]),  # ties
    )
    row = st.lists(value, min_size=vocab, max_size=vocab)
    logits = torch.tensor(draw(st.lists(row, min_size=n_rows, max_size=n_rows)))
    chosen = draw(st.lists(st.integers(0, n_rows - 1), unique=True, max_size=n_rows))
    use_all = draw(st.booleans())
    rows = None if use_all else torch.tensor(chosen, dtype=torch.long)
    k = n_rows if rows is None else len(chosen)
    params = {
        key: torch.tensor([draw(strategy) for _ in range(k)], dtype=torch.float32)
        for key, strategy in case.strategies.items()
    }
    temperature = st.floats(2.0**-16, 4.0, allow_nan=False, width=32)
    t0 = torch.tensor([draw(temperature) for _ in range(k)], dtype=torch.float32)
    return logits, rows, params, t0


def check_invariants(
    case: SamplerCase,
    before: torch.Tensor,
    after: torch.Tensor,
    rows: torch.Tensor | None,
    params: dict[str, torch.Tensor],
) -> None:
    selected = list(range(before.shape[0])) if rows is None else rows.tolist()
    for r in range(before.shape[0]):
        if r not in selected:
            same = torch.equal(bits(after[r]), bits(before[r]))
            assert same, f"row {r} was not selected but changed"
    assert not torch.isnan(after).any(), "NaN in the output"
    assert not (after == float("inf")).any(), "+inf in the output"
    for i, r in enumerate(selected):
        x, y = before[r], after[r]
        assert torch.isinf(y[x == NEG_INF]).all(), f"row {r}: a -inf entry came back"
        finite = x > NEG_INF
        if not finite.any():
            assert torch.equal(bits(y), bits(x)), f"row {r}: nothing finite, yet it changed"
            continue
        top = x == x.max()
        assert (y[top] > NEG_INF).all(), f"row {r}: the top token was dropped"
        if not case.definition.rescales:
            kept = y > NEG_INF
            assert torch.equal(y[kept], x[kept]), f"row {r}: a kept logit changed value"
        bound = case.definition.min_kept_mass
        if bound is not None:
            mass = torch.softmax(x.double(), dim=-1)[y > NEG_INF].sum().item()
            target = params[bound][i].item()
            assert mass >= min(target, 1.0) - 1e-5 or math.isclose(mass, 1.0), (
                f"row {r}: kept mass {mass} < {bound}={target}"
            )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_invariants_hold_for_any_batch(case: SamplerCase) -> None:
    @PROPERTY_SETTINGS
    @given(batch=batches(case))
    def run(batch: Batch) -> None:
        before, rows, params, t0 = batch
        after = before.clone()
        case.fast(after, params, t0, rows)
        check_invariants(case, before, after, rows, params)

    run()
