"""Image-text contrastive losses with negatives gathered from every rank (CLIP / GroupViT / OVSegmentor)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0; gradients flow back to each rank's own part."""
    rank, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def info_nce(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE: image (B, C) against text (T, C), both L2-normalised here.

    groups None: T == B and row i of each side is the other's positive (duplicates are negatives, as in CLIP and
    OVSegmentor); with ``gather`` each local row is contrasted against the rows of every rank and its positive
    sits at ``rank * B + i``. groups (B,): the index of each image's text among T unique texts (OVSeg's noun
    batches, local only): every image of a text counts as that text's positive.
    """
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    if groups is not None:
        logits = logit_scale * image @ text.t()
        image_to_text = F.cross_entropy(logits, groups)
        positives = F.one_hot(groups, text.shape[0]).t().to(logits.dtype)  # (T, B)
        log_prob = logits.t().log_softmax(dim=1)
        text_to_image = -((log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)).mean()
        return 0.5 * (image_to_text + text_to_image)
    rank = world()[0] if gather else 0
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    texts, images = (gather_with_grad(text), gather_with_grad(image)) if gather else (text, image)
    logits_image = logit_scale * image @ texts.t()
    logits_text = logit_scale * text @ images.t()
    return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))


def multi_label_info_nce(
    image: torch.Tensor,
    texts: torch.Tensor,
    valid: torch.Tensor,
    logit_scale: torch.Tensor,
    not_negative: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """GroupViT's multi-label contrastive loss: each image against K prompts of its own caption's words.

    image: (B, C); texts: (B, K, C) prompt embeddings ("a photo of a {noun}."); valid: (B, K) bool, False for
    padding prompts of captions with fewer than K words. An image's target is uniform over its valid prompts;
    a prompt's target is its image. Negatives are every other rank's prompts and images too.
    not_negative: optional pair from :func:`shared_prompt_masks` (image side (B, W*B*K), prompt side (B*K, W*B)):
    pairs left out of the softmax (neither positive nor negative). None: every other pair is a negative (official).
    """
    image, texts = F.normalize(image, dim=-1), F.normalize(texts, dim=-1)
    rank, _ = world()
    batch, k = valid.shape
    flat_texts, flat_valid = texts.reshape(batch * k, -1), valid.reshape(-1)
    all_texts, all_valid = gather_with_grad(flat_texts), gather_with_grad(flat_valid.float()).bool()
    all_images = gather_with_grad(image)

    logits_image = logit_scale * image @ all_texts.t()  # (B, W*B*K)
    logits_image = logits_image.masked_fill(~all_valid[None], float("-inf"))
    if not_negative is not None:
        logits_image = logits_image.masked_fill(not_negative[0], float("-inf"))
    owner = torch.arange(batch, device=image.device) + rank * batch
    target_image = torch.zeros_like(logits_image)
    columns = (owner[:, None] * k + torch.arange(k, device=image.device)[None]).reshape(-1)
    rows = torch.arange(batch, device=image.device).repeat_interleave(k)
    target_image[rows, columns] = flat_valid.to(target_image.dtype)  # any float dtype (float64 golden steps)
    has_prompt = valid.any(dim=1)
    if not has_prompt.any():  # still after the gathers, so every rank takes part in them
        return (image.sum() + texts.sum()) * 0.0
    target_image = target_image[has_prompt] / target_image[has_prompt].sum(dim=1, keepdim=True)
    log_prob_image = logits_image[has_prompt].log_softmax(dim=1).masked_fill(target_image == 0, 0.0)
    loss_image = -(target_image * log_prob_image).sum(dim=1).mean()

    logits_text = logit_scale * flat_texts[flat_valid] @ all_images.t()  # (valid prompts, W*B)
    if not_negative is not None:
        logits_text = logits_text.masked_fill(not_negative[1][flat_valid], float("-inf"))
    text_owner = owner.repeat_interleave(k)[flat_valid]
    loss_text = F.cross_entropy(logits_text, text_owner)
    return 0.5 * (loss_image + loss_text)


def gather_ids(ids: torch.Tensor, pad: int = -1) -> torch.Tensor:
    """Concatenate integer ids (B, M) of every rank along dim 0 (no gradient); M is padded to the largest."""
    rank, size = world()
    if size == 1:
        return ids
    width = torch.tensor([ids.shape[1]], device=ids.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    ids = F.pad(ids, (0, int(width) - ids.shape[1]), value=pad)
    parts = [torch.empty_like(ids) for _ in range(size)]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts, dim=0)


def shared_prompt_masks(prompt_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs :func:`multi_label_info_nce` should not count as negatives when several images name one entity.

    prompt_ids: (B, K) id of each sampled prompt (< 0: padding); image_ids: (B, M) ids of the prompts of *every*
    entity an image's caption names (< 0: padding). A prompt of another image that names an entity this image
    also holds is the same text as one of this image's prompts (a prompt of its own when sampled): it is not a
    negative of this image, and this image is not a negative of that prompt.
    Returns (image side (B, W*B*K), prompt side (B*K, W*B)) bool masks, True = leave out.
    """
    rank, _ = world()
    batch, k = prompt_ids.shape
    all_prompts = gather_ids(prompt_ids).reshape(-1)  # (W*B*K,), rank-major like the gathered embeddings
    all_images = gather_ids(image_ids)
    owner = torch.arange(batch, device=prompt_ids.device) + rank * batch
    holds = (image_ids[:, :, None] == all_prompts[None, None, :]).any(dim=1) & (all_prompts >= 0)[None]
    image_side = holds & (torch.arange(all_prompts.numel(), device=prompt_ids.device)[None] // k != owner[:, None])
    flat = prompt_ids.reshape(-1)
    named = (all_images[None, :, :] == flat[:, None, None]).any(dim=-1) & (flat >= 0)[:, None]
    prompt_side = named & (
        torch.arange(all_images.shape[0], device=prompt_ids.device)[None] != owner.repeat_interleave(k)[:, None]
    )
    return image_side, prompt_side
