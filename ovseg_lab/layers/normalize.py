"""Input normalisation constants: ImageNet statistics for the backbones trained on them (timm / torchvision ResNets
and ViTs, Swin, DINO) and OpenAI CLIP's for the CLIP towers (``CLIPBackbone.normalize``) and for what is filled with
CLIP's mean colour (OVSeg's masked crops)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
