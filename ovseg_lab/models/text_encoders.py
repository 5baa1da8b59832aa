"""Text towers of the caption-supervised methods: BERT (OVSegmentor) and the GroupViT transformer.

Both map strings to a pooled feature (B, W) and per-token features (B, L, W). BERT comes from transformers
(``bert-base-uncased`` by default, or a random-init ``BertConfig`` with a small word-level WordPiece vocabulary
for tests and the toy benchmark); the GroupViT tower is open_clip's text transformer (width 256, 12 layers,
trained from scratch, CLIP BPE tokenizer shipped with open_clip).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ovseg_lab.errors import SetupError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BERT_OFFLINE_HINT = (
    "without internet, place bert-base-uncased's config.json, vocab.txt and tokenizer_config.json (plus "
    "model.safetensors or pytorch_model.bin, unless the weights come from a checkpoint) in one folder, e.g. "
    "checkpoints/bert-base-uncased/, and set model.net.text_encoder.pretrained=checkpoints/bert-base-uncased; or "
    "run once with internet so transformers caches it in ~/.cache/huggingface/hub; or set "
    "model.net.text_encoder.pretrained=null with model.net.text_encoder.vocab_words for a tiny random tower "
    "(numbers will be meaningless)"
)


def word_level_tokenizer(words: Sequence[str], max_length: int):
    """A BERT-style (lower-casing, WordPiece) fast tokenizer over a small vocabulary: the given whole words,
    then single characters so that any other word still tokenises (letter by letter) instead of to [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits
    entries = list(SPECIAL_TOKENS) + [w.lower() for w in words] + list(chars) + list(string.punctuation)
    entries += [f"##{c}" for c in chars]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(entries))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


class BertTextEncoder(nn.Module):
    """BERT text tower: CLS hidden state as the pooled feature.

    Args:
        pretrained: a transformers hub name or local folder ("bert-base-uncased"); None for random init.
        pretrained_weights: load the pretrained weights (False/None: only its config and tokenizer, random
            weights; a checkpoint or converted release supplies them).
        config: ``BertConfig`` fields for random init (tiny test/toy towers), applied over the pretrained config
            when the weights are not loaded; ``vocab_size`` is set from the tokenizer when ``vocab_words`` is given.
        vocab_words: whole words of a small offline tokenizer (see :func:`word_level_tokenizer`); only with
            ``pretrained=None``.
        max_length: caption tokens kept (77 in OVSegmentor).
        padding: ``max_length`` pads every text to ``max_length`` tokens, as the release does for captions,
            questions, answers and entity prompts (main_pretrain.py:233-242; the padding tokens reach the
            entity decoder and the projector's BatchNorm statistics); ``longest`` pads to the batch's longest text.
    """

    supports_masking = True

    def __init__(
        self,
        pretrained: str | None = "bert-base-uncased",
        config: Mapping[str, Any] | None = None,
        vocab_words: Sequence[str] | None = None,
        max_length: int = 77,
        padding: str = "max_length",
        pretrained_weights: bool | None = True,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel

        if padding not in ("max_length", "longest"):
            raise SetupError(f"text_encoder.padding must be 'max_length' or 'longest', got '{padding}'.")
        self.max_length = max_length
        self.padding = padding
        if pretrained:
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
                if pretrained_weights:
                    self.bert = BertModel.from_pretrained(pretrained, add_pooling_layer=False)
                else:
                    bert_config = AutoConfig.from_pretrained(pretrained)
                    for key, value in dict(config or {}).items():
                        setattr(bert_config, key, value)
                    self.bert = BertModel(bert_config, add_pooling_layer=False)
            except (OSError, ValueError) as err:
                raise SetupError(
                    f"Could not load the BERT text encoder '{pretrained}' ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:160] if str(err) else ''}): {BERT_OFFLINE_HINT}."
                ) from None
        else:
            if not vocab_words:
                raise SetupError(
                    "A random-init BERT text encoder needs text_encoder.vocab_words (its tokenizer vocabulary)."
                )
            self.tokenizer = word_level_tokenizer(list(vocab_words), max_length)
            fields = dict(config or {})
            fields["vocab_size"] = len(self.tokenizer)
            fields.setdefault("max_position_embeddings", max(max_length, 32))
            self.bert = BertModel(BertConfig(**fields), add_pooling_layer=False)
        self.mask_token_id = int(self.tokenizer.mask_token_id)
        self.pad_token_id = int(self.tokenizer.pad_token_id)

    @property
    def width(self) -> int:
        return int(self.bert.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.bert.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    def tokenize(self, texts: Sequence[str], offsets: bool = False) -> dict[str, Any]:
        """input_ids / attention_mask (B, L) on the tower's device (+ offset_mapping (B, L, 2) on the CPU)."""
        encoded = self.tokenizer(
            list(texts),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_offsets_mapping=offsets,
        )
        out = {
            "input_ids": encoded["input_ids"].to(self.device),
            "attention_mask": encoded["attention_mask"].to(self.device),
        }
        if offsets:
            out["offset_mapping"] = encoded["offset_mapping"]
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> pooled (B, W) = the [CLS] state, tokens (B, L, W)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden[:, 0], hidden

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Strings -> pooled (B, W), tokens (B, L, W), attention mask (B, L)."""
        tokens = self.tokenize(texts)
        pooled, hidden = self(tokens["input_ids"], tokens["attention_mask"])
        return pooled, hidden, tokens["attention_mask"]


class GroupViTTextEncoder(nn.Module):
    """GroupViT's text transformer (causal, end-of-text token pooled), built with open_clip, random init.

    activation: the MLP activation. ``quick_gelu`` (x * sigmoid(1.702 x)) is the official one (GroupViT
    ``models/utils.py:47``, as in OpenAI's CLIP, and the ``hidden_act`` of transformers' ``GroupViTTextConfig``);
    ``gelu`` (exact GELU) is open_clip's default, kept as a named option.
    """

    supports_masking = False
    ACTIVATIONS = ("quick_gelu", "gelu")

    def __init__(
        self,
        context_length: int = 77,
        width: int = 256,
        layers: int = 12,
        heads: int | None = None,
        vocab_size: int = 49408,
        activation: str = "quick_gelu",
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.transformer import QuickGELU, TextTransformer

        if activation not in self.ACTIVATIONS:
            raise SetupError(
                f"model.net.text_encoder.activation must be one of {self.ACTIVATIONS}, got '{activation}'."
            )
        self.activation = activation
        self.transformer = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads or max(1, width // 64),
            layers=layers,
            output_dim=None,
            proj_type="none",
            output_tokens=True,
            act_layer=QuickGELU if activation == "quick_gelu" else nn.GELU,
        )
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)

    @property
    def width(self) -> int:
        return int(self.transformer.width)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Strings -> pooled (B, W), tokens (B, L, W), attention mask (B, L) (1 up to the end-of-text token)."""
        device = self.transformer.token_embedding.weight.device
        ids = self.tokenizer(list(texts)).to(device)
        pooled, tokens = self.transformer(ids)
        mask = (torch.arange(ids.shape[1], device=device)[None] <= ids.argmax(dim=-1, keepdim=True)).long()
        return pooled, tokens, mask
