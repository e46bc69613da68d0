"""Networks of the method: reconstruction ``R``, weight-decay segmentation ``S`` and the
whole model with inference (:class:`FrequencyAwareModel`)."""

from .model import (FrequencyAwareModel, ModelOutput, image_scores, load_checkpoint,
                    model_from_checkpoint, msgms_anomaly_map)
from .reconstruction import ReconstructionNetwork
from .segmentation import SegmentationNetwork

__all__ = ["FrequencyAwareModel", "ModelOutput", "ReconstructionNetwork", "SegmentationNetwork",
           "image_scores", "load_checkpoint", "model_from_checkpoint", "msgms_anomaly_map"]
