"""Input normalisation constants shared by the models whose backbones were trained on ImageNet statistics (timm /
torchvision ResNets and ViTs, Swin, DINO); CLIP towers normalise with their own (``CLIPBackbone.normalize``)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
