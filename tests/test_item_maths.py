"""ITEM's equations against hand computations and independent implementations: misalignment (Eq. 3-8), the
MLP head and its loss (Eq. 9-10), the noun-phrase chunker and the box/phrase utilities of grounding (Eq. 5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss

from projects.item_detector.frozen import crop
from projects.item_detector.grounding import (
    assign_phrases,
    clip_boxes,
    cxcywh_to_xyxy,
    phrase_token_spans,
    select_objects,
)
from projects.item_detector.head import MisalignmentHead, fake_probability, item_bce
from projects.item_detector.misalignment import (
    empty_local_fallback,
    hierarchical_distance,
    local_distance,
    misalignment_vector,
)
from projects.item_detector.phrases import noun_phrases

# --- Eq. 3-8 -------------------------------------------------------------------------------------------------


def test_eq3_misalignment_is_the_difference_of_unit_vectors_by_hand() -> None:
    # I = (3, 4) -> (0.6, 0.8); T = (0, 2) -> (0, 1); D = (0.6, -0.2)
    d = misalignment_vector(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]))
    assert torch.allclose(d, torch.tensor([0.6, -0.2]))


def test_eq3_squared_length_is_two_minus_twice_the_cosine_similarity() -> None:
    """Fig. 3: |D|^2 = 2 - 2 cos(I, T), whatever the embedding lengths (checked against torch's cosine)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(5, 3, 16, generator=generator) * 7.0
    text = torch.randn(5, 3, 16, generator=generator) * 0.1
    d = misalignment_vector(image, text)
    expected = 2 - 2 * F.cosine_similarity(image, text, dim=-1)
    assert d.shape == image.shape
    assert torch.allclose(d.pow(2).sum(-1), expected, atol=1e-5)


def test_eq3_is_finite_for_a_zero_embedding() -> None:
    d = misalignment_vector(torch.zeros(4), torch.tensor([0.0, 0.0, 5.0, 0.0]))
    assert torch.equal(d, torch.tensor([0.0, 0.0, -1.0, 0.0]))


def test_eq7_averages_the_real_objects_and_falls_back_when_there_are_none() -> None:
    objects = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],  # two objects + padding
            [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],  # nothing grounded
        ]
    )
    mask = torch.tensor([[True, True, False], [False, False, False]])
    fallback = torch.tensor([[-1.0, -1.0], [7.0, -7.0]])
    assert torch.equal(local_distance(objects, mask, fallback), torch.tensor([[2.0, 3.0], [7.0, -7.0]]))


def test_eq8_weights_the_global_and_local_distances() -> None:
    d = hierarchical_distance(torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), w_global=0.5, w_local=2.0)
    assert torch.equal(d, torch.tensor([6.5, -1.0]))
    both = hierarchical_distance(torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]))
    assert torch.equal(both, torch.tensor([4.0, 1.0]))  # the paper's w1 = w2 = 1


def test_empty_local_policy_is_the_global_distance_or_zero() -> None:
    d_global = torch.tensor([[0.5, -0.5]])
    assert torch.equal(empty_local_fallback(d_global, "global"), d_global)
    assert torch.equal(empty_local_fallback(d_global, "zero"), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="empty_local"):
        empty_local_fallback(d_global, "mean")  # type: ignore[arg-type]


# --- Eq. 9-10 ------------------------------------------------------------------------------------------------


def test_eq9_head_is_two_linear_layers_with_a_relu() -> None:
    head = MisalignmentHead(4, 3).eval()
    first, second = head.layers[0], head.layers[3]
    x = torch.randn(6, 4)
    by_hand = torch.relu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias
    assert torch.allclose(head(x), by_hand, atol=1e-6)
    assert head(x).shape == (6, 2)


def test_eq10_is_binary_cross_entropy_of_the_generated_softmax_output() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0], [-0.5, 1.5], [1.0, 1.2]])
    labels = torch.tensor([1, 0, 1, 0])
    p = fake_probability(logits)
    assert math.isclose(float(p[0]), 0.5)
    expected = log_loss(labels.numpy(), p.numpy(), normalize=False)  # -sum(y log p + (1-y) log(1-p))
    assert math.isclose(float(item_bce(logits, labels, reduction="sum")), expected, rel_tol=1e-6)
    assert math.isclose(float(item_bce(logits, labels)), expected / 4, rel_tol=1e-6)
    # one example by hand: logits (0, 0), y = 1 -> -log(0.5)
    assert math.isclose(float(item_bce(logits[:1], labels[:1])), math.log(2), rel_tol=1e-6)


# --- noun phrases --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "phrases"),
    [
        (
            "close-up of a gate valve with a cast iron body, a red handwheel, a tall bonnet and two round "
            "flanges with four bolts each, with rust spots",
            [
                "gate valve",
                "cast iron body",
                "red handwheel",
                "tall bonnet",
                "round flanges",
                "bolts",
                "rust spots",
            ],
        ),
        ("a man riding a horse on a beach", ["man", "horse", "beach"]),
        ("a close-up photo of a red car parked next to two tall buildings", ["red car", "tall buildings"]),
        ("a red and white sign on a building", ["red and white sign", "building"]),
        ("there is a cat sitting on the chair.", ["cat", "chair"]),
        ("A dog and a DOG", ["dog"]),
        ("the sign is red and", ["sign", "red"]),
        ("", []),
        ("   ", []),
    ],
)
def test_noun_phrases_of_captions(caption: str, phrases: list[str]) -> None:
    assert noun_phrases(caption) == phrases


def test_noun_phrases_are_capped_in_caption_order() -> None:
    assert noun_phrases("a cat, a dog, a bird and a fish", max_phrases=2) == ["cat", "dog"]


# --- grounding utilities -------------------------------------------------------------------------------------


def test_boxes_are_clipped_to_the_image_and_outside_ones_flagged() -> None:
    boxes = torch.tensor([[-5.0, 10.0, 50.0, 200.0], [1.0, 1.0, 5.0, 5.0]])
    clipped, outside = clip_boxes(boxes, width=40, height=100)
    assert torch.equal(clipped, torch.tensor([[0.0, 10.0, 40.0, 100.0], [1.0, 1.0, 5.0, 5.0]]))
    assert outside.tolist() == [True, False]


def test_select_objects_drops_small_and_outside_boxes_suppresses_duplicates_and_keeps_the_best() -> None:
    phrases = ["valve", "valve", "bolt", "bolt", "flange", "handle"]
    boxes = torch.tensor(
        [
            [0.0, 0.0, 50.0, 50.0],  # valve, 0.9
            [2.0, 2.0, 50.0, 50.0],  # same valve again, 0.8: suppressed (IoU > 0.5)
            [60.0, 60.0, 62.0, 62.0],  # 2 px bolt: dropped
            [70.0, 10.0, 90.0, 30.0],  # bolt, 0.5
            [150.0, 150.0, 170.0, 170.0],  # entirely outside the 100x100 image: dropped
            [10.0, 60.0, 30.0, 120.0],  # handle reaching out of the image, 0.7: clipped
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.95, 0.5, 0.99, 0.7])
    found = select_objects(phrases, boxes, scores, width=100, height=100, max_objects=2, min_box_size=4)
    assert found.phrases == ["valve", "handle"]
    assert torch.equal(found.boxes, torch.tensor([[0.0, 0.0, 50.0, 50.0], [10.0, 60.0, 30.0, 100.0]]))
    assert found.boxes_outside == 2 and found.boxes_dropped == 2


def test_select_objects_keeps_the_grounder_order_on_tied_scores() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]])
    found = select_objects(["a", "b", "c"], boxes, torch.ones(3), 64, 64, max_objects=2)
    assert found.phrases == ["a", "b"]
    assert select_objects([], torch.zeros(0, 4), torch.zeros(0), 64, 64, 4).phrases == []


def test_detr_boxes_become_pixel_corners() -> None:
    boxes = cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]]), width=100, height=50)
    assert torch.allclose(boxes, torch.tensor([[40.0, 15.0, 60.0, 35.0]]))


def test_phrase_token_spans_follow_the_tokenizer_offsets() -> None:
    # BERT tokens of "gate valve. red handwheel. bolt." (Grounding DINO's prompt format)
    offsets = [(0, 0), (0, 1), (1, 4), (5, 10), (10, 11), (12, 15), (16, 17), (17, 20), (20, 21), (21, 22)]
    offsets += [(22, 25), (25, 26), (27, 31), (31, 32), (0, 0)]
    spans = phrase_token_spans(offsets, [(0, 10), (12, 25), (27, 31), (40, 44)])
    assert spans == [[1, 2, 3], [5, 6, 7, 8, 9, 10], [12], []]


def test_each_box_takes_the_phrase_with_its_best_token() -> None:
    probs = torch.tensor(
        [
            [0.1, 0.9, 0.2, 0.3, 0.0],  # best token 1 -> phrase 0
            [0.1, 0.2, 0.1, 0.6, 0.7],  # phrase 1 has tokens 3, 4 -> 0.7
        ]
    )
    index, score = assign_phrases(probs, [[1, 2], [3, 4], []])
    assert index.tolist() == [0, 1]
    assert torch.allclose(score, torch.tensor([0.9, 0.7]))


def test_crops_round_box_edges_outwards() -> None:
    image = torch.arange(3 * 10 * 10, dtype=torch.float32).reshape(3, 10, 10)
    patch = crop(image, [1.5, 2.2, 4.1, 5.0])
    assert patch.shape == (3, 3, 4)
    assert torch.equal(patch, image[:, 2:5, 1:5])
