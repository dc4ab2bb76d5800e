"""proxoptim: Proximal Backpropagation (Frerix et al., ICLR 2018) as a torch.optim optimizer."""

from proxoptim.optimizer import LayerStats, ProxPropOptimizer

__all__ = ["LayerStats", "ProxPropOptimizer"]
__version__ = "0.1.0"
