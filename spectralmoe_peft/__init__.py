"""SpectralMoE (arXiv 2603.13352) as a Hugging Face PEFT method.

Importing this package registers ``PeftType.SPECTRALMOE`` with peft, so ``get_peft_model`` and
``PeftModel.from_pretrained`` work with SpectralMoE adapters like with any in-tree method.
"""

from .registration import SPECTRALMOE, register  # extends PeftType first: the config needs the member

from .config import SpectralMoEConfig  # noqa: E402
from .forward_state import RoutingStats  # noqa: E402
from .hub import set_model_card_info  # noqa: E402
from .layer import SpectralMoELayer  # noqa: E402
from .model import SpectralMoEModel  # noqa: E402

register(SpectralMoEConfig, SpectralMoEModel)

__version__ = "0.1.0"
__all__ = ["SPECTRALMOE", "RoutingStats", "SpectralMoEConfig", "SpectralMoELayer", "SpectralMoEModel", "__version__",
           "set_model_card_info"]
