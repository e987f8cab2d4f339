"""FedAvg's arithmetic: weighted means of state dicts, and the states it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from fedmagic.strategies.aggregate import WeightedMean, check_state, non_finite, weighted_mean
from fedmagic.errors import AggregationError, UnsupportedTensor

UNIT_ROUNDOFF32 = 2.0 ** -24  # float32's unit roundoff u: half an ulp of 1.0


def random_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 3, 3, 3, generator=generator),
            "fc.weight": torch.randn(10, 32, generator=generator) * 1e3,
            "fc.bias": torch.randn(10, generator=generator) * 1e-3}


def scalar(value, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([value], dtype=dtype)}


# The mean.

def test_weighted_mean_equals_float64_hand_computation_within_float32_rounding():
    # Prepare
    weights = [480, 479, 479]
    states = [random_state(seed) for seed in range(3)]
    total = sum(weights)
    # Execute
    mean = weighted_mean(zip(states, weights))
    # Assert
    for name in states[0]:
        exact = sum(w * s[name].double() for w, s in zip(weights, states)) / total
        magnitude = sum(w * s[name].double().abs() for w, s in zip(weights, states)) / total
        # 3 float32 products and sums err by at most 3u, the division by u more (Higham, ch. 4)
        bound = 4 * UNIT_ROUNDOFF32 * (1 + 1e-6) * magnitude
        assert mean[name].dtype == torch.float32
        assert bool(((mean[name].double() - exact).abs() <= bound).all()), name


def test_equal_weights_give_the_plain_mean():
    # Prepare
    updates = [(scalar(1.0, torch.float32), 5), (scalar(2.0, torch.float32), 5),
               (scalar(6.0, torch.float32), 5)]
    # Execute
    mean = weighted_mean(updates)
    # Assert
    assert mean["x"].tolist() == [3.0]


def test_weights_pull_the_mean_toward_the_bigger_update():
    # Prepare
    updates = [(scalar(0.0, torch.float64), 1), (scalar(4.0, torch.float64), 3)]
    # Execute
    mean = weighted_mean(updates)
    # Assert
    assert mean["x"].tolist() == [3.0]


def test_float64_stays_float64_at_full_precision():
    # Prepare
    states = [{"x": torch.tensor([1.0 + 2.0 ** -40, 1e-300], dtype=torch.float64)},
              {"x": torch.tensor([1.0, 3e-300], dtype=torch.float64)}]
    # Execute
    mean = weighted_mean([(states[0], 1), (states[1], 1)])
    # Assert
    assert mean["x"].dtype == torch.float64
    assert mean["x"].tolist() == [1.0 + 2.0 ** -41, 2e-300]


@pytest.mark.parametrize("dtype, big, float32_mean, low_precision_mean", [
    # 2048 + 1 + 1 is 2048 when summed in float16 (its spacing there is 2)
    (torch.float16, 2048.0, 683.5, 682.5),
    # 256 + 1 + 1 is 256 when summed in bfloat16 (its spacing there is 2)
    (torch.bfloat16, 256.0, 86.0, 85.5),
], ids=["float16", "bfloat16"])
def test_half_precision_is_accumulated_in_float32_and_cast_back(
        dtype, big, float32_mean, low_precision_mean):
    # Prepare
    updates = [(scalar(big, dtype), 1), (scalar(1.0, dtype), 1), (scalar(1.0, dtype), 1)]
    # Execute
    mean = weighted_mean(updates)
    # Assert
    assert mean["x"].dtype == dtype
    assert mean["x"].tolist() == [float32_mean]
    assert mean["x"].tolist() != [low_precision_mean]


@pytest.mark.parametrize("values, expected", [
    ((1, 2), 2),   # 1.5 rounds to 2
    ((1, 4), 2),   # 2.5 rounds to 2: half to even
    ((3, 4), 4),   # 3.5 rounds to 4
    ((2, 2), 2),
    ((-1, -4), -2),  # -2.5 rounds to -2
])
def test_integer_tensors_are_averaged_and_rounded_half_to_even(values, expected):
    # Prepare
    updates = [(scalar(value, torch.int64), 10) for value in values]
    # Execute
    mean = weighted_mean(updates)
    # Assert
    assert mean["x"].dtype == torch.int64
    assert mean["x"].tolist() == [expected]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint64])
def test_integer_dtype_is_kept(dtype):
    # Prepare
    updates = [(scalar(10, dtype), 1), (scalar(20, dtype), 3)]
    # Execute
    mean = weighted_mean(updates)
    # Assert
    assert mean["x"].dtype == dtype
    assert mean["x"].tolist() == [18]


def test_batchnorm_counter_is_averaged_as_an_integer():
    # Prepare
    states = []
    for batches in (100, 103):
        state = torch.nn.BatchNorm1d(3).state_dict()
        state["num_batches_tracked"] = torch.tensor(batches)
        states.append(state)
    # Execute
    mean = weighted_mean([(states[0], 1), (states[1], 1)])
    # Assert
    assert mean["num_batches_tracked"].dtype == torch.int64
    assert mean["num_batches_tracked"].item() == 102  # 101.5 rounds to even


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_tensors_are_averaged(dtype):
    # Prepare
    updates = [(scalar(1 + 2j, dtype), 1), (scalar(3 - 4j, dtype), 3)]
    # Execute
    mean = weighted_mean(updates)
    # Assert
    assert mean["x"].dtype == dtype
    assert mean["x"].tolist() == [2.5 - 2.5j]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_are_averaged(dtype):
    # Prepare
    updates = [(scalar(1.0, dtype), 1), (scalar(2.0, dtype), 1)]
    # Execute
    mean = weighted_mean(updates)
    # Assert
    assert mean["x"].dtype == dtype
    assert mean["x"].float().tolist() == [1.5]


def test_a_single_update_is_its_own_mean():
    # Prepare
    state = random_state(0)
    # Execute
    mean = weighted_mean([(state, 8)])  # a power of two: scaling by it is exact
    # Assert
    assert all(torch.equal(mean[name], state[name]) for name in state)


# Inputs and memory.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.int64, torch.complex64])
def test_inputs_are_never_modified_or_shared(dtype):
    # Prepare
    states = [{"x": (torch.arange(6) * (i + 1)).to(dtype)} for i in range(3)]
    copies = [{"x": state["x"].clone()} for state in states]
    # Execute
    mean = weighted_mean([(state, 1.0) for state in states])
    mean["x"].fill_(0)
    # Assert
    for state, copy in zip(states, copies):
        assert torch.equal(state["x"], copy["x"])


def test_accumulators_are_allocated_once_however_many_updates_arrive():
    # Prepare
    state = random_state(0)
    mean = WeightedMean(state)
    accumulators = dict(mean._sums)
    pointers = {name: total.data_ptr() for name, total in accumulators.items()}
    # Execute
    for i in range(50):
        mean.add(random_state(i), 1 + i)
    # Assert
    assert all(mean._sums[name] is total for name, total in accumulators.items())
    assert {name: total.data_ptr() for name, total in mean._sums.items()} == pointers
    assert mean.count == 50
    assert mean.total_weight == sum(range(1, 51))


def test_updates_that_require_grad_do_not_build_a_graph():
    # Prepare
    layer = torch.nn.Linear(3, 2)
    parameters = dict(layer.named_parameters())
    mean = WeightedMean(parameters)
    # Execute
    mean.add(parameters, 1)
    mean.add(parameters, 2)
    result = mean.result()
    # Assert
    assert not any(total.requires_grad for total in mean._sums.values())
    assert not any(tensor.requires_grad for tensor in result.values())
    assert torch.allclose(result["weight"], layer.weight.detach())


def test_result_can_be_taken_before_every_update_is_in():
    # Prepare
    mean = WeightedMean(scalar(0.0, torch.float32))
    mean.add(scalar(2.0, torch.float32), 1)
    # Execute
    early = mean.result()
    mean.add(scalar(4.0, torch.float32), 1)
    late = mean.result()
    # Assert
    assert early["x"].tolist() == [2.0]
    assert late["x"].tolist() == [3.0]


# What cannot be averaged.

def test_no_updates_is_an_aggregation_error():
    # Execute / Assert
    with pytest.raises(AggregationError) as caught:
        weighted_mean([])
    assert str(caught.value) == "cannot average: no update was given"


def test_result_before_any_update_is_an_aggregation_error():
    # Prepare
    mean = WeightedMean(scalar(0.0, torch.float32))
    # Execute / Assert
    with pytest.raises(AggregationError) as caught:
        mean.result()
    assert str(caught.value) == "cannot average: no update was added in this round"


@pytest.mark.parametrize("weight", [0, -1, -0.5, math.nan, math.inf])
def test_weight_that_is_not_positive_and_finite_is_refused(weight):
    # Prepare
    updates = [(scalar(1.0, torch.float32), 1), (scalar(2.0, torch.float32), weight)]
    # Execute / Assert
    with pytest.raises(AggregationError) as caught:
        weighted_mean(updates)
    assert str(caught.value) == ("cannot average: weight must be positive and finite (the "
                                 f"number of samples behind the update), got {weight!r}")


def test_updates_whose_names_differ_are_refused():
    # Prepare
    updates = [({"a": torch.zeros(1), "b": torch.zeros(1)}, 1),
               ({"a": torch.zeros(1), "c": torch.zeros(1)}, 1)]
    # Execute / Assert
    with pytest.raises(AggregationError) as caught:
        weighted_mean(updates)
    assert str(caught.value) == "cannot average: updates differ in their tensors: ['b', 'c']"


def test_updates_whose_shapes_differ_are_refused_not_broadcast():
    # Prepare
    updates = [({"w": torch.zeros(3)}, 1), ({"w": torch.ones(1)}, 1)]
    # Execute / Assert
    with pytest.raises(AggregationError) as caught:
        weighted_mean(updates)
    assert str(caught.value) == "cannot average: tensor 'w' has shape (1,), the reference has (3,)"


def test_a_refused_update_leaves_the_running_mean_untouched():
    # Prepare
    mean = WeightedMean({"a": torch.zeros(2), "b": torch.zeros(2)})
    mean.add({"a": torch.ones(2), "b": torch.ones(2)}, 1)
    # Execute
    with pytest.raises(AggregationError) as caught:
        mean.add({"a": torch.full((2,), 9.0)}, 1)
    # Assert
    assert str(caught.value) == ("cannot average: the update's tensors differ from the "
                                 "reference's: ['b']")
    assert mean.count == 1
    assert mean.total_weight == 1
    assert mean.result()["a"].tolist() == [1.0, 1.0]


# Checking a model's state before round 1.

def test_check_state_accepts_a_normal_models_state_dict():
    # Prepare
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    state = model.state_dict()
    # Execute / Assert
    assert state["1.num_batches_tracked"].dtype == torch.int64
    check_state(state)


BAD_STATES = {
    "bool tensor": (
        {"mask": torch.ones(2, dtype=torch.bool)},
        "state_dict()['mask'] is a torch.bool tensor: FedAvg cannot average flags (the mean "
        "of True and False is no bool). Return it as a float or integer tensor from "
        "state_dict() and convert it back in load_state_dict(), or leave it out"),
    "non-tensor value": (
        {"step": 3},
        "state_dict()['step'] is a value of type int, not a tensor: only tensors are "
        "averaged; keep other values out of state_dict() or turn them into tensors"),
    "non-string key": (
        {3: torch.zeros(1)},
        "state_dict()[3] is stored under a key of type int: state dict keys travel as "
        "strings; rename it"),
    "sparse tensor": (
        {"adjacency": torch.eye(2).to_sparse()},
        "state_dict()['adjacency'] is a torch.sparse_coo tensor: only dense tensors "
        "travel; call .to_dense() in state_dict()"),
    "not a mapping": (
        [("w", torch.zeros(1))],
        "state_dict() is a list, not a mapping: state_dict() must return a dict of "
        "name -> tensor"),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_check_state_refuses_what_fedavg_cannot_average_and_says_what_to_do(case):
    # Prepare
    state, message = BAD_STATES[case]
    # Execute / Assert
    with pytest.raises(UnsupportedTensor) as caught:
        check_state(state)
    assert str(caught.value) == message


def test_check_state_refuses_a_dtype_that_cannot_travel():
    # Prepare
    state = {"w": torch.zeros(1, dtype=torch.float8_e4m3fnuz)}
    # Execute / Assert
    with pytest.raises(UnsupportedTensor,
                       match=r"^state_dict\(\)\['w'\] is a torch.float8_e4m3fnuz tensor: "
                             r"supported dtypes are float16, bfloat16, "):
        check_state(state)


# Non-finite values.

def test_non_finite_names_the_tensors_with_nan_or_infinity():
    # Prepare
    state = {
        "nan": torch.tensor([1.0, math.nan]),
        "fine": torch.tensor([1.0, 2.0]),
        "inf": torch.tensor([-math.inf], dtype=torch.float16),
        "empty": torch.zeros(0),
        "complex": torch.tensor([complex(1, math.inf)]),
        "float8": torch.tensor([math.nan]).to(torch.float8_e4m3fn),
        "bf16": torch.tensor([math.inf], dtype=torch.bfloat16),
    }
    # Execute
    names = non_finite(state)
    # Assert
    assert names == ["nan", "inf", "complex", "float8", "bf16"]


def test_finite_values_whose_sum_overflows_are_not_taken_for_infinity():
    # Prepare: each value is finite, but their sum is beyond the dtype's range
    state = {
        "float32": torch.full((4,), 3e38),
        "float16": torch.full((3,), 60000.0, dtype=torch.float16),
        "float64": torch.full((2,), 1e308, dtype=torch.float64),
        "then_nan": torch.cat([torch.full((2,), 3e38), torch.tensor([math.nan])]),
    }
    # Execute / Assert
    assert non_finite(state) == ["then_nan"]


def test_non_finite_ignores_integer_tensors():
    # Prepare
    state = {"count": torch.tensor(torch.iinfo(torch.int64).max),
             "small": torch.tensor([7, 0, 255], dtype=torch.uint8)}
    # Execute / Assert
    assert non_finite(state) == []


def test_mean_computed_in_place_equals_the_pure_mean_and_reuses_the_accumulators():
    reference = {"w": torch.zeros(4), "steps": torch.zeros((), dtype=torch.int64)}
    updates = [({"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "steps": torch.tensor(3)}, 2.0),
               ({"w": torch.tensor([3.0, 2.0, 1.0, 0.0]), "steps": torch.tensor(6)}, 1.0)]
    mean = WeightedMean(reference)
    for state, weight in updates:
        mean.add(state, weight)
    expected = mean.result()

    in_place = mean.combine()

    assert torch.equal(in_place["w"], expected["w"])
    assert torch.equal(in_place["steps"], expected["steps"])
    assert mean.shares_memory_with({"w": in_place["w"]})
    assert not mean.shares_memory_with({"steps": in_place["steps"]})  # int64: a new tensor


def test_reset_starts_a_new_mean_in_the_same_memory():
    mean = WeightedMean({"w": torch.zeros(3)})
    mean.add({"w": torch.ones(3)}, 1.0)
    first = mean.combine()
    pointer = first["w"].data_ptr()

    mean.reset()
    mean.add({"w": torch.full((3,), 5.0)}, 2.0)
    second = mean.combine()

    assert second["w"].data_ptr() == pointer
    assert torch.equal(second["w"], torch.full((3,), 5.0))


def test_in_place_mean_of_nothing_is_refused():
    with pytest.raises(AggregationError, match="no update was added in this round"):
        WeightedMean({"w": torch.zeros(1)}).combine()
