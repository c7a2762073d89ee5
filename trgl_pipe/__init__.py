"""trgl_pipe: module-wise training with the TRGL transport regularization, as a lock-free pipeline.

The public API (everything else is private and may change):

- :func:`train`: run a config, optionally with your own network and data, in one process or
  under torchrun; returns the summary.
- :class:`Network` and :class:`Residual`: what a ``model.arch`` builder returns and builds its
  blocks from (see docs/your-own-network.md).
- :func:`load_config` and :class:`Config`: the typed, validated configuration.
- :class:`UserError`: raised for bad input, with a one-line message.
"""

from trgl_pipe.api import build_config, train
from trgl_pipe.config import Config, load_config
from trgl_pipe.errors import UserError
from trgl_pipe.models.user import Network, Residual

__version__ = "0.1.0"

__all__ = ["Config", "Network", "Residual", "UserError", "build_config", "load_config", "train"]
