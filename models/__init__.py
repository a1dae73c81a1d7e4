"""Models: torchvision encoders (ResNet, MobileNetV3, EfficientNet, RegNetY), UNet decoders, the multi-decoder
model, its losses and its files."""
from models.io import load_model, save_model
from models.losses import FocalLoss, depth_loss
from models.model import ModelConfig, MultiDecoderModel, build_model

__all__ = ["FocalLoss", "ModelConfig", "MultiDecoderModel", "build_model", "depth_loss", "load_model", "save_model"]
