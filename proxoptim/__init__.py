"""proxoptim: Proximal Backpropagation (Frerix et al., ICLR 2018) as a torch.optim optimizer."""

from proxoptim.operators import LayerKind, register_layer, unregister_layer
from proxoptim.optimizer import LayerStats, ProxPropOptimizer

__all__ = ["LayerKind", "LayerStats", "ProxPropOptimizer", "register_layer", "unregister_layer"]
__version__ = "0.1.0"
