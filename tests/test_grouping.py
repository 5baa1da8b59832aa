"""Grouping layers: hard assignment is one-hot in the forward pass and still passes gradients."""

from __future__ import annotations

import torch

from ovseg_lab.layers.grouping import AssignAttention, GroupingBlock, gumbel_softmax, hard_softmax


def test_gumbel_hard_assignment_is_one_hot_and_straight_through():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 50, requires_grad=True)
    assign = gumbel_softmax(logits, tau=1.0, hard=True, dim=1)
    # forward: exactly one group per token, values exactly 0 or 1
    assert torch.equal(assign.sum(dim=1), torch.ones(2, 50))
    assert set(assign.detach().unique().tolist()) <= {0.0, 1.0}
    # backward: the gradient is the soft sample's, not zero (an argmax alone would give none)
    weights = torch.randn(2, 8, 50)
    (assign * weights).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_straight_through_gradient_equals_the_softmax_gradient():
    logits = torch.randn(3, 5, 7)
    weights = torch.randn(3, 5, 7)
    a = logits.clone().requires_grad_(True)
    (hard_softmax(a, dim=1) * weights).sum().backward()
    b = logits.clone().requires_grad_(True)
    (b.softmax(dim=1) * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert torch.equal(
        hard_softmax(logits, 1), torch.nn.functional.one_hot(logits.argmax(1), 5).permute(0, 2, 1).float()
    )


def test_assign_attention_hard_in_training_and_deterministic_in_eval():
    torch.manual_seed(0)
    layer = AssignAttention(16, hard=True, gumbel=True)
    groups, tokens = torch.randn(2, 4, 16), torch.randn(2, 30, 16, requires_grad=True)
    layer.train()
    out, assignment = layer(groups, tokens)
    assert out.shape == (2, 4, 16)
    assert torch.equal(assignment.hard.detach().sum(dim=1), torch.ones(2, 30))
    assert torch.allclose(assignment.soft.sum(dim=1), torch.ones(2, 30), atol=1e-5)
    out.sum().backward()
    assert (
        tokens.grad.abs().sum() > 0 and layer.q_proj.weight.grad.abs().sum() > 0
    )  # q gets gradients through the assignment
    layer.eval()
    first, a1 = layer(groups, tokens)
    second, a2 = layer(groups, tokens)
    assert torch.equal(first, second)  # no Gumbel noise at evaluation
    assert torch.equal(a1.hard.argmax(dim=1), a1.soft.argmax(dim=1))


def test_grouping_block_pools_tokens_into_the_requested_number_of_groups():
    torch.manual_seed(0)
    block = GroupingBlock(dim=32, out_dim=48, num_heads=4, num_group_tokens=16, num_output_groups=5)
    tokens, group_tokens = torch.randn(3, 40, 32), torch.randn(3, 16, 32)
    new, assignment = block(tokens, group_tokens)
    assert new.shape == (3, 5, 48)
    assert (
        assignment.hard.shape == (3, 5, 40) and assignment.q.shape == (3, 5, 32) and assignment.k.shape == (3, 40, 32)
    )
    # permuting the image tokens permutes the assignment and leaves the segments unchanged (in eval mode)
    block.eval()
    perm = torch.randperm(40)
    new_a, assign_a = block(tokens, group_tokens)
    new_b, assign_b = block(tokens[:, perm], group_tokens)
    assert torch.allclose(new_a, new_b, atol=1e-4)
    assert torch.allclose(assign_a.soft[:, :, perm], assign_b.soft, atol=1e-5)
