"""The plain-PyTorch DeepSeek model family (no torch.distributed): see docs/ARCHITECTURE.md, "Model"."""
from pretrain.model.moe import update_expert_bias
from pretrain.model.transformer import DeepSeekModel, ModelOutput, build_model, cross_entropy_loss

__all__ = ["DeepSeekModel", "ModelOutput", "build_model", "cross_entropy_loss", "update_expert_bias"]
