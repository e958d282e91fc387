"""brats-lightning: self-ensembled, deeply-supervised 3D U-Nets for brain-tumor segmentation.

A PyTorch Lightning + Hydra reproduction of Henry, Carre et al., "Brain tumor segmentation with
self-ensembled, deeply-supervised 3D U-net neural networks: a BraTS 2020 challenge solution".
"""

__version__ = "0.1.0"
