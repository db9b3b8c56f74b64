"""argmax_index picks the token torch.argmax picks: the first of equal maxima, the first NaN."""

import pytest
import torch

from model.sampling import InvalidLogits, Sampler, SamplingParams, argmax_index


def rows() -> list:
    generator = torch.Generator().manual_seed(7)
    random = torch.randn(151_936, generator=generator)
    tied = torch.zeros(1_001)
    tied[[17, 400, 999]] = 3.0
    with_nan = random.clone()
    with_nan[[5_000, 90_000]] = float("nan")
    infinities = torch.full((333,), float("-inf"))
    infinities[[12, 200]] = float("inf")
    signed_zeros = torch.tensor([-1.0, -0.0, 0.0, -2.0])
    return [
        pytest.param(random, id="random-vocabulary"),
        pytest.param(random.to(torch.bfloat16), id="random-bf16"),  # many ties after rounding
        pytest.param(tied, id="three-equal-maxima"),
        pytest.param(with_nan, id="nan"),
        pytest.param(infinities, id="infinities"),
        pytest.param(torch.full((9,), float("-inf")), id="all-minus-infinity"),
        pytest.param(signed_zeros, id="signed-zeros"),
        pytest.param(torch.randn(4, 50, generator=generator)[2], id="strided-view"),
    ]


@pytest.mark.parametrize("values", rows())
def test_argmax_index_agrees_with_torch(values):
    assert argmax_index(values) == int(values.argmax())


def test_greedy_sampler_takes_the_first_of_equal_maxima():
    logits = torch.zeros(50, dtype=torch.bfloat16)
    logits[[31, 8]] = 1.5
    sampler = Sampler(SamplingParams(temperature=0.0))
    assert sampler.sample(logits) == 8
    assert int(sampler.probabilities(logits).argmax()) == 8


def unusable_rows() -> list:
    nan = torch.randn(1_000, generator=torch.Generator().manual_seed(3))
    nan[[10, 700]] = float("nan")
    inf = torch.zeros(1_000)
    inf[12] = float("inf")
    return [pytest.param(nan, id="nan"), pytest.param(inf, id="infinite-winner"),
            pytest.param(torch.full((9,), float("-inf")), id="all-minus-infinity")]


@pytest.mark.parametrize("values", unusable_rows())
@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_scores_that_are_not_numbers_stop_with_a_clear_error(values, temperature):
    sampler = Sampler(SamplingParams(temperature=temperature, seed=0))
    with pytest.raises(InvalidLogits, match="NaN or infinite"):
        sampler.sample(values)
    with pytest.raises(InvalidLogits):
        sampler.probabilities(values)


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_very_negative_scores_beside_a_finite_winner_are_usable(temperature):
    values = torch.full((50,), float("-inf"))
    values[[3, 40]] = torch.tensor([1.0, 2.5])
    assert Sampler(SamplingParams(temperature=temperature, seed=0)).sample(values) in (3, 40)
