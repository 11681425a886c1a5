"""fseft: few-shot parameter-efficient fine-tuning of volumetric CT segmentation foundation models.

Implements (and extends) Silva-Rodríguez, Dolz & Ben Ayed, "Towards Foundation Models and Few-Shot
Parameter-Efficient Fine-Tuning for Volumetric Organ Segmentation", Medical Image Analysis 2025
(arXiv 2303.17051).
"""

__version__ = "0.1.0"
