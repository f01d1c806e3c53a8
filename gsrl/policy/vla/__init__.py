"""The pi0.5-layout vision-language-action policy: config presets, network, flow samplers, tokenizer.

Import ``gsrl.policy.vla.policy.VLAPolicy`` (registry kind ``"vla"``) for the ``Policy`` interface; this
package's ``__init__`` stays light so ``gsrl.policy.vla.flow`` can be used without building a model.
"""

from gsrl.policy.vla.config import PRESETS, StreamConfig, VisionConfig, VLAConfig, vla_config

__all__ = ["PRESETS", "StreamConfig", "VLAConfig", "VisionConfig", "vla_config"]
