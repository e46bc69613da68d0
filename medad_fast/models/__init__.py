"""Networks shared by the methods (reconstruction, U-Nets, autoencoders) and the scoring
of their outputs."""

from .autoencoder import ConvAutoencoder, DenseAutoencoder
from .ensemble import AutoencoderEnsemble
from .model import MODES, FrequencyAwareModel, ModelOutput
from .reconstruction import ReconstructionNetwork
from .refinement import RefinementNet
from .scoring import image_scores, msgms_anomaly_map, score_filter_size, smoothed_residual_map
from .segmentation import SegmentationNetwork

__all__ = ["AutoencoderEnsemble", "ConvAutoencoder", "DenseAutoencoder", "FrequencyAwareModel", "MODES", "ModelOutput",
           "ReconstructionNetwork", "RefinementNet", "SegmentationNetwork", "image_scores", "msgms_anomaly_map", "score_filter_size", "smoothed_residual_map"]
